"""Everything about weights: Components and fingerprints (components.py), the synthetic presets'
random weights (synthetic.py, random_weights.py, tokenizers.py), checkpoints on disk (layout.py checks
a download, checkpoints.py reads and writes diffusers folders, bfl.py BFL's single file,
safetensors_files.py the files themselves), LoRA fusion (lora.py), and load.py, which picks between them.

Imports go one way: components <- synthetic, bfl, layout <- checkpoints <- load; lora needs only
components. Import from the submodules (engine.model.load.load_components); this file imports nothing.
"""
