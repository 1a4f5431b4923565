"""Raw data to RecBole atomic files plus images; each module is also a script (see README.md)."""
