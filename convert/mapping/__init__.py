"""The key-map machinery, above `convert.read`: a format's table of torch keys onto our weights
(`keymaps`), the layout change of each tensor both ways (`layouts`), and a source's whole way
onto our weights (`conversion`).
"""
