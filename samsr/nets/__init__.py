"""Networks: the RRDB conditioning encoder and the time-conditioned UNet."""
from samsr.nets.rrdb import RRDBNet
from samsr.nets.unet import UNet

__all__ = ["RRDBNet", "UNet"]
