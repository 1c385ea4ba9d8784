"""Lightning callbacks that watch the wrong-dip during other people's fine-tunes (installed as dipreg.callbacks).

``dipreg.callbacks.hf.DipMonitorCallback`` is the same monitor for the HF ``Trainer``.
"""

from dipreg.callbacks.compression_retention import CompressionRetention
from dipreg.callbacks.dip_monitor import DipMonitor
from dipreg.callbacks.probe import DipProbe, MonitorSetupError

__all__ = ["CompressionRetention", "DipMonitor", "DipProbe", "MonitorSetupError"]
