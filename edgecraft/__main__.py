"""`python -m edgecraft` is the `edgecraft` command; torchrun starts ranks this way
(`torchrun --nproc_per_node=N -m edgecraft train RECIPE.toml`)."""

from edgecraft.cli import app

app(prog_name="edgecraft")
