class Recorder:  # placeholder until written
    pass
