"""Methods by name (`registry`): each builds an operator and, where it needs one, runs a prepare step
on the source first (`ligo`: train the operator; `subclone`: calibrate). `base` has what those steps
get: the `Context` and a `Trainer`."""
