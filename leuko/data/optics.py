"""Physical constants of refractive-index (RI) tomography of leukocytes, and the default class list.

The numbers follow the RI tomography study of leukocytes by Ryu et al. (2021): cells imaged in a medium of
RI 1.337, voxels above RI 1.35 are the cell, and protein concentration follows the linear RI increment of
protein, C = (n - n_medium) / 0.2 mL/g. Every module that needs one of them imports it from here.
"""

# The default leukocyte classes, in label-index order.
DEFAULT_CLASSES = ("neutrophil", "eosinophil", "lymphocyte", "monocyte")

# RI of the culture medium / PBS the cells are imaged in (Ryu et al. 2021).
N_MEDIUM = 1.337
# Voxels above this RI are the cell (Ryu et al. 2021); the medium and noise around it stay below.
RI_CELL_THRESHOLD = 1.35
# RI increment of protein in mL/g: C [g/mL] = (n - n_medium) / 0.2 (Ryu et al. 2021; Barer 1952).
RI_INCREMENT_ML_PER_G = 0.2
