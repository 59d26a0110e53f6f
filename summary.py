"""Task 1's questions about the lab's net, answered from the layer objects themselves.

    rows = model_summary(net)              # shapes, parameters, receptive fields, memory per layer
    print(format_summary(rows, net[0].input_shape))
"""
import numpy as np

import layers


def model_summary(net, batch_size=50):
    """Answers task 1's questions from the layers themselves: one dict per layer, then one for the loss.

    shape:   the layer's output shape for a batch of `batch_size`
    params:  number of weights and biases
    rf:      receptive field of one output unit in input pixels, per side (None: the whole input).
             Propagated from the input: a k x k window over units `jump` pixels apart adds
             (k - 1) * jump pixels, and a stride multiplies jump. Units at the border see part of it as padding.
    kept:    what the layer's forward keeps for backward, e.g. 'x_cols float32 (25, 25, 1568)' (conv1's
             im2col columns, in blocks of 2 images); found by running one forward pass of zeros,
             so it is what the code stores, not what a textbook says
    bytes:   {'float32': ..., 'float64': ...}: memory of what is kept if the net ran in that dtype
             (float arrays scale with the dtype; masks and indices do not)
    """
    x = np.zeros((batch_size,) + tuple(net[0].input_shape[1:]), dtype=net[0].dtype)
    rows, rf, jump = [], 1, 1
    for layer in net:
        x = layer.forward(x)
        kept = {name: value for name, value in vars(layer).items()
                if isinstance(value, np.ndarray) and name not in ('weights', 'bias')}
        if isinstance(layer, layers.Convolution):
            rf, jump = rf + (layer.kernel_size - 1) * jump, jump * layer.stride
        elif isinstance(layer, layers.MaxPooling):
            rf, jump = rf + (layer.pool_size - 1) * jump, jump * layer.stride
        elif isinstance(layer, layers.FC):
            rf = None  # every output sees every input
        rows.append({'name': layer.name, 'shape': x.shape,
                     'params': layer.weights.size + layer.bias.size if layer.has_params else 0, 'rf': rf,
                     'kept': ', '.join(f'{name} {value.dtype} {value.shape}' for name, value in kept.items()) or '-',
                     'bytes': _bytes_by_dtype(kept.values())})
    # The loss's backward recomputes the softmax from the logits, which the training loop holds until then.
    rows.append({'name': 'loss', 'shape': (), 'params': 0, 'rf': None,
                 'kept': f'logits {x.dtype} {x.shape}', 'bytes': _bytes_by_dtype([x])})
    return rows


def _bytes_by_dtype(arrays):
    return {dtype: sum(a.size * (np.dtype(dtype).itemsize if a.dtype.kind == 'f' else a.itemsize) for a in arrays)
            for dtype in ('float32', 'float64')}


def _human_bytes(num_bytes):
    for unit in ('B', 'kB', 'MB'):
        if num_bytes < 1000 or unit == 'MB':
            return f'{num_bytes:.0f} {unit}' if unit == 'B' else f'{num_bytes:.1f} {unit}'
        num_bytes /= 1000


def format_summary(rows, input_shape):
    """model_summary's rows as a text table with totals; input_shape (N, C, H, W) names the full field."""
    lines = [f"{'layer':9} {'output shape':17} {'params':>8} {'receptive field':>15} "
             f"{'kept: float32':>13} {'float64':>9}  what backward needs"]
    for row in rows:
        rf = '' if row['name'] == 'loss' else \
            f"all {input_shape[-2]}x{input_shape[-1]}" if row['rf'] is None else f"{row['rf']}x{row['rf']}"
        lines.append(f"{row['name']:9} {str(row['shape']):17} {row['params']:>8,} {rf:>15} "
                     f"{_human_bytes(row['bytes']['float32']):>13} {_human_bytes(row['bytes']['float64']):>9}  "
                     f"{row['kept']}")
    totals = {dtype: sum(row['bytes'][dtype] for row in rows) for dtype in ('float32', 'float64')}
    lines.append(f"{'total':9} {'':17} {sum(row['params'] for row in rows):>8,} {'':>15} "
                 f"{_human_bytes(totals['float32']):>13} {_human_bytes(totals['float64']):>9}")
    return '\n'.join(lines)
