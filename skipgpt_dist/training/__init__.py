"""The training system: one loop over pluggable engines (single process, DeepSpeed, FSDP2)."""
