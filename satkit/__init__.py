"""The library behind the scripts at the root (train.py, eval.py, caption.py, create_input_files.py).

Model side at this level (attention, encoders, decoding, config, checkpoints, captioner, figures,
plugins, validation); data/ packs and streams datasets, training/ and evaluation/ are the two loops'
engines, infra/ is what every run needs (errors, devices, atomic files, progress). Nothing is imported
here: `from satkit.data.packing import pack`, never `satkit.pack`.
"""
