"""The loop (`distill iterate`): `stage.py` holds a loop round's stages and folders (its plan,
the copies of the rounds before it, the student's sampling, the teacher's scoring); the command
that runs the rounds in order is `stages.commands.iterate`."""
