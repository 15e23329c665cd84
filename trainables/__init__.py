"""Worker side of the study: what one Ray Tune trial does.

data -> patches + inverse weights -> 3D U-Net -> loss -> validation records.
Nothing in this package imports ``study`` (the driver side).
"""
