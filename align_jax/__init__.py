"""align-jax: aligning language models with human preferences in JAX."""

import os as _os

# transformers advises at import that PyTorch is missing: align-jax never needs it at run time.
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
