"""Lightning callbacks that watch the wrong-dip during other people's fine-tunes (installed as dipreg.callbacks)."""
