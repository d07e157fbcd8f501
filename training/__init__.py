"""Training, export (torch lives here). Installed as ``medvision.training``; needs ``medvision-radiology[train,cpu]`` (or ``gpu``)."""
