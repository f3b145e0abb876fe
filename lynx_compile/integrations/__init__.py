"""Helpers for running lynx-compiled models inside other engines (torch.distributed)."""
