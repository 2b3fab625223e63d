"""`tagi-ds plan`: per-stage GPU memory, host memory, disk, start-up forwards, ZeRO-3 traffic and time of a run,
from shapes alone (meta-device models, a length summary of the data), modelling the stage code as it is today.

shapes.py        backbone / hypernetwork counts and dtypes (meta device, offline)
data_summary.py  task and instance counts, token lengths per split (the data when at hand, else stated assumptions)
activations.py   bytes autograd saves through the frozen backbone
structures.py    one byte formula per structure a stage holds, each citing the code it models
stages_*.py      the stages as phases of parts; report.py the whole plan, limits and knobs; cli.py the command
bench/scale_sim.py runs the real stages on a narrow backbone and compares with these numbers.
"""
