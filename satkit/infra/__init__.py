"""What every run needs: user errors as one line, devices and DDP, atomic files and locks, progress lines."""
