"""Methods by name (`registry`): each builds an operator and, where it needs one, runs a prepare step
on the source first (`ligo`: train the operator; `subclone`, `experts`: calibrate, through
`calibration`). Each declares its options once (`options`); `base` has what the steps get: the
`Context` and a `Trainer`. Methods never import `train/`: training uses methods, not the reverse."""
