"""Names of the files and folders in a training checkpoint and in an export, in one place.

The engines and train.py write these, the tools (merge_lora, consolidate, calibrate_routers) and the resume path
read them: both sides import the name from here, so a rename cannot leave one side behind. Imports nothing.
"""

# ---------------------------------------------------------------- a run folder and its checkpoints
CHECKPOINTS = "checkpoints"  # run_dir/checkpoints/step_NNNNNNNN/
LOCK_FILE = ".lock"  # run_dir/.lock: one writer per run folder
STATE_FILE = "trainer_state.json"  # written last: the commit marker and the file manifest
CONFIG_FILE = "config.yaml"  # the fully resolved TrainConfig

# ---------------------------------------------------------------- portable artifacts (every back end)
ROUTERS_FILE = "routers.safetensors"  # router weights of a checkpoint or export (safetensors)
ADAPTER_DIR = "adapter"  # stage 2: the LoRA adapter in peft's format
ADAPTER_CONFIG_FILE = "adapter_config.json"  # peft's names for the two files of an adapter folder
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"

# ---------------------------------------------------------------- each engine's own files
TRAINABLE_FILE = "trainable.safetensors"  # one process: the trainable tensors
OPTIMIZER_FILE = "optimizer.pt"  # one process: optimiser + scheduler state (torch.save, read weights_only)
DEEPSPEED_DIR = "deepspeed"  # DeepSpeed: its own checkpoint folder (ZeRO partitions)
DEEPSPEED_LAYOUT_FILE = "skipgpt_layout.json"  # in deepspeed/: world size and ZeRO stage it was written with
DCP_DIR = "dcp"  # FSDP2: torch.distributed.checkpoint folder (reshardable)
SCHEDULER_FILE = "scheduler.json"  # FSDP2: LR schedule state beside dcp/

# ---------------------------------------------------------------- a Hugging Face model folder (base or export)
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "spiece.model", "sentencepiece.bpe.model")
