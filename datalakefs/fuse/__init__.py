"""The FUSE layer: the only package that imports pyfuse3.

``operations`` converts between pyfuse3's types and the filesystem's and turns domain errors into
errnos; ``session`` mounts, runs and unmounts, and tunes the kernel side after INIT.
"""
