"""lm-evaluation-harness task folders shipped with skipgpt-dist (pass this folder to `--include_path`)."""
