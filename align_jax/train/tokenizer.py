"""The run's tokenizer: `model.tokenizer`, or the one next to `model.init_from` (the toy tokenizer for 'toy' and
'random:<config.json>'), with an optional chat template (`model.chat_template`: 'chatml' or a .jinja file)."""

from __future__ import annotations

import os

from align_jax.errors import SetupError
from align_jax.train.model import require_model_dir


def load_tokenizer(config):
    from transformers import AutoTokenizer

    from align_jax.data.toy import TOKENIZER_DIR

    path, key = config.model.tokenizer, "model.tokenizer"
    if not path:
        init = config.model.init_from
        path = str(TOKENIZER_DIR) if init == "toy" or init.startswith("random:") else init
        key = "model.init_from"
    require_model_dir(key, path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise SetupError(f"config.{key}={path!r}: no tokenizer could be loaded from it ({e}); give a directory "
                         f"with tokenizer.json / tokenizer_config.json via --config.model.tokenizer") from None
    template = config.model.get("chat_template", "")
    if template == "chatml":
        tokenizer.chat_template = CHATML_TEMPLATE
    elif template:
        if not os.path.isfile(template):
            raise SetupError(f"config.model.chat_template={template!r}: neither 'chatml' nor a .jinja file")
        with open(template) as f:
            tokenizer.chat_template = f.read()
    return tokenizer


# ChatML (<|im_start|>role\ncontent<|im_end|>\n), as Qwen and SmolLM use it; the generation prompt opens an
# assistant turn. The EOS of the tokenizer is not added: the template ends each turn with <|im_end|>.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
