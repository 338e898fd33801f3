"""Pipelines that write reports: ``compress`` (the main job), ``compare``, ``plan``, ``size``; run folders
(``runstate``, ``runfolder``), progress and ETA, thread setup. No argparse here: the command line is ``edkm.cli``."""
