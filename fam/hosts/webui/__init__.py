"""What every WebUI host (AUTOMATIC1111 and the Forge family) shares, below the script.

The script (`scripts/fam_diffusion.py`) owns the UI and the WebUI hooks and passes what only
the WebUI can do through a small `WebUI` object; a host module (`fam.hosts.a1111`,
`fam.hosts.forge`) makes one `WebUIGeneration` per batch with its own UNet hooks. Here lives
the rest, once: request checks and sizes (`request`), the batch's phase state machine
(`generation`), FAM's place in `process_images` (`process`) and the other extensions of a
job (`extensions`). Nothing here imports `modules`, so CI tests all of it."""

from ..unet_hooks import GEN_ATTR
from .extensions import alwayson, find_script, refusal
from .generation import WebUIGeneration
from .process import Host, SampleWrapper, WebUI, begin_pass
from .request import (alphas_cumprod_schedule, check_model, check_request, model_family,
                      model_name, native_side, reference_size, upscaled_reference)

__all__ = ["GEN_ATTR", "WebUI", "Host", "WebUIGeneration", "SampleWrapper", "begin_pass",
           "alphas_cumprod_schedule", "check_model", "check_request", "model_family",
           "native_side", "reference_size", "upscaled_reference", "model_name", "alwayson",
           "find_script", "refusal"]
