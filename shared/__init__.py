"""What every role shares: wire, crypto, run state, model parts, data.

Nothing here may reach the internet at run time: the Hugging Face libraries are told they are
offline before any of them is imported (bitsandbytes, for one, otherwise tries to download a CPU
kernel from the hub when it is imported), so every model and tokenizer comes from local files.
"""

import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _not_the_offline_kernel_notice(record: logging.LogRecord) -> bool:
    # bitsandbytes then uses its built-in CPU kernel: the hub's is an optional speed-up we refuse
    # to download, which is not worth two warnings in every role's log.
    return "kernels-community" not in record.getMessage()


for _name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
    logging.getLogger(_name).addFilter(_not_the_offline_kernel_notice)
