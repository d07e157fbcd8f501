"""Training, export (torch lives here). Installed as ``medvision.training``; needs ``medvision[train]``."""
