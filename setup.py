from setuptools import find_packages, setup

# torch is pinned by the environment (a CPU wheel on the build machines, a CUDA wheel on clusters);
# we only state the range the code is tested with.
setup(
    name="skipgpt-dist",
    version="0.1.0",
    description="Distributed SkipGPT: per-token attention/MLP skipping with real compute savings",
    packages=find_packages(include=["skipgpt_dist", "skipgpt_dist.*"]),
    # lm-eval task files (YAML + questions) travel with the package: --include_path skipgpt_dist/lm_eval_tasks
    package_data={"skipgpt_dist.lm_eval_tasks.skipgpt_mc": ["*.yaml", "*.jsonl"],
                  "skipgpt_dist.lm_eval_tasks.skipgpt_general_mc": ["*.yaml", "*.jsonl"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6,<2.15",
        "transformers>=5.20,<5.30",
        "peft>=0.17",
        "datasets>=3.0",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "pyyaml>=6",
        "tqdm>=4.60",
        "tokenizers>=0.20",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-xdist>=3.5", "deepspeed>=0.16", "wandb>=0.18", "submitit>=1.5", "gguf>=0.10", "matplotlib>=3.7",
                "lm-eval==0.4.13"],
        # lm-eval is pinned: skipgpt_dist/lm_eval_model.py subclasses its HFLM and drives its command line.
        "eval": ["lm-eval==0.4.13"],
        "gpu": ["flash-attn>=2.6"],
        "deepspeed": ["deepspeed>=0.16"],
    },
    # `lm_eval` itself cannot load an external model class (see skipgpt_dist/lm_eval_model.py): this is lm-eval's
    # command line with `--model skipgpt` registered.
    entry_points={"console_scripts": ["skipgpt-lm-eval = skipgpt_dist.lm_eval_model:main"]},
)
