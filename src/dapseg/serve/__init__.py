"""`dapseg serve`: a Label Studio ML backend (``/health``, ``/setup``, ``/predict``) that pre-annotates
images with brush masks. ``label_config`` reads the project's labeling config, ``media`` reads the task
images (from Label Studio or a local-files root), ``prediction`` turns a segmentation into brush
results, ``service`` queues and bounds the work, ``app`` is the HTTP layer."""
