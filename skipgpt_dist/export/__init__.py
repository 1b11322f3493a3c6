"""Export trained SkipGPT checkpoints: merge LoRA into the base weights (tools/merge_lora.py) and consolidate
sharded checkpoints into one safetensors file (tools/consolidate.py).

Every checkpoint, whatever the back end, holds the portable artifacts `routers.safetensors` and (stage 2)
`adapter/` in peft's format, so tools read those first. Without them the trained tensors come from the engine's own
files: `trainable.safetensors` (one process), DeepSpeed's ZeRO partitions (`deepspeed/`, rebuilt with DeepSpeed's
zero_to_fp32 under a weights-only torch.load), or a DCP folder (`dcp/`, read without a process group). Those engine
files hold pickles (DCP `.metadata`, DeepSpeed `*_states.pt`): before anything reads them, each is checked against the
size and sha256 that the checkpoint's trainer_state.json recorded when it was written (`verify_engine_files`), so a
damaged, replaced or added file is a one-line error and is never unpickled.

Merging streams: the base model's safetensors shards are read one at a time (`safe_open`) and each output shard is
written tensor by tensor (header first, then the bytes; see `write_safetensors`), so peak memory is about one shard
(the mapped input pages) plus the adapters, never the whole model. W' = W + s * B @ A is computed in fp32 and cast
back to the base dtype, s = lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA), as peft merges it.

Outputs appear atomically: everything is written into a temp folder (or file) beside the target, flushed, then
renamed into place; a replaced target (`force`) is moved aside first and restored if the rename fails.

The parts, one job each:
- `safetensors_writer`: the streaming safetensors writer (`TensorSpec`, `write_safetensors`);
- `atomic`: outputs that appear whole or not at all (`atomic_dir`, `atomic_file`) and the checks on their paths;
- `base_model`: a Hugging Face model folder's shard headers and a shard-at-a-time tensor reader;
- `checkpoint_reader`: a training checkpoint, its routers and the trained tensors of its engine files, read through
  `zero_reader` (DeepSpeed) and `dcp_reader` (FSDP2) when the portable artifacts are missing;
- `lora`: the checkpoint's LoRA pairs (peft adapter or engine files) and the merge of one weight;
- `shared`: the checks and helpers merge and consolidate share;
- `merge` (`merge_lora`) and `consolidation` (`consolidate`): the two tools.
File and folder names come from `skipgpt_dist.file_names`. This package re-exports the names callers used when it
was one module.
"""
from ..file_names import (ADAPTER_DIR, DCP_DIR, DEEPSPEED_DIR, INDEX_FILE, ROUTERS_FILE, SINGLE_FILE,  # noqa: F401
                          TOKENIZER_FILES, TRAINABLE_FILE)
from .atomic import atomic_dir, atomic_file  # noqa: F401
from .base_model import BaseModel, ShardReader, open_base_model  # noqa: F401
from .checkpoint_reader import (Checkpoint, engine_trainable_state, open_checkpoint, read_routers,  # noqa: F401
                                verify_engine_files)
from .consolidation import consolidate  # noqa: F401
from .lora import PEFT_PREFIX, Lora, LoraPair, read_lora  # noqa: F401
from .merge import EXPORT_FORMAT_VERSION, merge_lora, skipgpt_section  # noqa: F401
from .safetensors_writer import TensorSpec, write_safetensors  # noqa: F401
from .shared import check_fits  # noqa: F401
