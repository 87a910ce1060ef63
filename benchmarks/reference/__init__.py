"""Adapters that time a method's official implementation at a benchmark case's shapes, from a checkout the user
names (`step_throughput.py --reference PATH`). Nothing of the reference is vendored: its modules are imported from
that checkout at run time."""
