"""Drop-in entry points for users of other tools; see `surgery.compat.fusion_bench`."""
