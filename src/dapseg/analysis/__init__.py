"""How coherent is an affinity? Each patch affinity scored as a classifier of "these two patches share
a label" (ProxyCLIP, Fig. 1): pair labels from ground truth, pairs counted into fixed score
histograms (constant memory), precision–recall curves and AP from the histograms."""
