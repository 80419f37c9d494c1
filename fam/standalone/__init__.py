"""The standalone runner, `python -m fam generate`: FAM on a diffusers model, no WebUI.

Needs the optional `standalone` extra (diffusers, transformers); the WebUI extension never
imports this package."""
