"""What a user calls: the Dynamo backend, its options, calibration, ``explain`` and the command line.

The public names are re-exported by ``qcompiler`` itself; import them from there.
"""
