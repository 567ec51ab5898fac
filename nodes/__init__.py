"""ComfyUI glue: thin V3 nodes and the adapter that installs ``vp2p`` on a ModelPatcher clone."""
