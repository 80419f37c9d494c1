"""FAM Diffusion core: Frequency and Attention Modulation for high-resolution generation with
Stable Diffusion (arXiv 2411.18552), pure torch and host-neutral. Host adapters live in
`fam.hosts`; nothing here imports a WebUI."""

from .params import FamParamError, FamParams

__all__ = ["FamParams", "FamParamError"]
__version__ = "0.1.0"
