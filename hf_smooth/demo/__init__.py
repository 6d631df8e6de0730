"""The demo kit: embedded offline assets, data helpers and the comparison report used by the recipes, notebooks
and benchmarks. Not part of the library: `import hf_smooth` imports nothing from here, and these modules may
need the `[demo]` extra (datasets, sacrebleu, pyyaml, gguf, polib)."""
