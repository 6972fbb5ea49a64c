"""Wire layer: the message schema, the frame codec (tensors as zero-copy frames), async ZeroMQ
channels with CURVE security, and the torch.distributed weight broadcast."""
