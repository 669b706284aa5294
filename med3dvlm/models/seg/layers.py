"""Layer tables indexed by the number of spatial dimensions (2 or 3), shared by DCA and the U-Nets."""
import torch.nn as nn
import torch.nn.functional as F

CONV = {2: nn.Conv2d, 3: nn.Conv3d}
BATCH_NORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
MAX_POOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
ADAPTIVE_AVG_POOL = {2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
LINEAR_MODE = {2: "bilinear", 3: "trilinear"}
