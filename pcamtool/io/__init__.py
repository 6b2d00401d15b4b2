"""Reading and writing files: atomic writes, id,value CSVs, tifs, stores, image sources."""
