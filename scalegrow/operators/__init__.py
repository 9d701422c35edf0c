"""Operators: pure tensor maths from a source model to a target model (growth, shrink, identity).
No readers, data, training loops or schedules here; `scalegrow.methods` registers them by name and
runs whatever must happen before an operator can map (training LiGO, calibrating subcloning)."""
