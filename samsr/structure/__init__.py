"""Structure maps from segment masks: RLE storage and ordering (`masks`), SAM-DiffSR's structural
position encoding (`spe`, METHOD.md §A) and the segmenters that produce the masks (`segmenters`).

`masks` and `spe` are plain numpy; only `segmenters` imports torch and segment-anything.
"""
