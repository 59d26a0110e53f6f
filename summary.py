"""Task 1's questions about the lab's net, answered from the layer objects themselves.

    rows = model_summary(net)                  # per layer: output shape, parameters, receptive field, memory
    print(format_summary(rows))                # the table with totals
    answers(rows, fast_rows)                   # the lab's questions answered in words, from these numbers
"""
import numpy as np

import layers


def model_summary(net, batch_size=50):
    """One dict per layer, computed by running one forward pass of zeros through the net:

    name, shape: the layer's output shape for a batch of `batch_size` (the first row, 'input', is the input)
    params:      number of weights and biases
    rf:          receptive field of one output unit in input pixels, per side (None: the whole input).
                 Propagated from the input: a k x k window over units `jump` pixels apart adds
                 (k - 1) * jump pixels, and a stride multiplies jump. Border units see part of it as padding.
    jump:        how many input pixels apart the layer's neighbouring output units are (None after an FC)
    activations: values of the layer's output, the textbook's count of what backprop needs (each layer's
                 gradients need its input, which is the output below); 0 where the output is a view of
                 the input (Flatten), which takes no memory of its own
    kept:        what the layer's forward stores for its backward, e.g. 'x_cols float32 (400, 9800)';
                 what this code holds, not what a textbook says
    bytes:       {'float32': ..., 'float64': ...}: memory of what is kept if the net ran in that dtype
                 (float arrays scale with the dtype; masks and indices do not)
    """
    x = np.zeros((batch_size,) + tuple(net[0].input_shape[1:]), dtype=net[0].dtype)
    rows = [{'name': 'input', 'shape': x.shape, 'params': 0, 'rf': 1, 'jump': 1, 'activations': x.size, 'kept': '-',
             'bytes': {'float32': 0, 'float64': 0}}]
    rf, jump = 1, 1
    for layer in net:
        out = layer.forward(x)
        kept = {name: value for name, value in vars(layer).items()
                if isinstance(value, np.ndarray) and name not in ('weights', 'bias')}
        if isinstance(layer, layers.Convolution):
            rf, jump = rf + (layer.kernel_size - 1) * jump, jump * layer.stride
        elif isinstance(layer, layers.MaxPooling):
            rf, jump = rf + (layer.pool_size - 1) * jump, jump * layer.stride
        elif isinstance(layer, layers.FC):
            rf = jump = None  # every output sees every input
        rows.append({'name': layer.name, 'shape': out.shape, 'rf': rf, 'jump': jump,
                     'params': layer.weights.size + layer.bias.size if layer.has_params else 0,
                     'activations': 0 if np.shares_memory(out, x) else out.size,
                     'kept': ', '.join(f'{name} {value.dtype} {value.shape}' for name, value in kept.items()) or '-',
                     'bytes': _bytes_by_dtype(kept.values())})
        x = out
    # The loss's backward recomputes the softmax from the logits, which the training loop holds until then.
    rows.append({'name': 'loss', 'shape': (), 'params': 0, 'rf': None, 'jump': None, 'activations': 0,
                 'kept': f'logits {x.dtype} {x.shape}', 'bytes': _bytes_by_dtype([x])})
    return rows


def _bytes_by_dtype(arrays):
    return {dtype: sum(a.size * (np.dtype(dtype).itemsize if a.dtype.kind == 'f' else a.itemsize) for a in arrays)
            for dtype in ('float32', 'float64')}


def memory(rows):
    """The memory question, both ways, from model_summary's rows: a dict of the numbers format_summary explains."""
    activations = sum(row['activations'] for row in rows)
    conv_cols = [row for row in rows if 'x_cols' in row['kept']]
    cols_values = sum(row['bytes']['float64'] // 8 for row in conv_cols)
    conv_inputs = sum(previous['activations'] for previous, row in zip(rows, rows[1:]) if row in conv_cols)
    return {'batch_size': rows[0]['shape'][0], 'activations': activations,
            'activations_bytes': {'float32': 4 * activations, 'float64': 8 * activations},
            'kept_bytes': {dtype: sum(row['bytes'][dtype] for row in rows) for dtype in ('float32', 'float64')},
            'im2col_values': cols_values, 'conv_input_values': conv_inputs,
            'im2col_bytes': {'float32': 4 * cols_values, 'float64': 8 * cols_values}}


def human_bytes(num_bytes):
    for unit in ('B', 'kB', 'MB'):
        if num_bytes < 1000 or unit == 'MB':
            return f'{num_bytes:.0f} {unit}' if unit == 'B' else f'{num_bytes:.1f} {unit}'
        num_bytes /= 1000


def format_summary(rows):
    """model_summary's rows as a text table with totals, then the memory for backprop explained."""
    size = rows[0]['shape'][-2:]
    lines = [f"{'layer':9} {'output shape':17} {'params':>8} {'receptive field':>15} {'activations':>11} "
             f"{'kept: float32':>13} {'float64':>9}  what backward needs"]
    for row in rows:
        rf = '' if row['name'] in ('input', 'loss') else \
            f"all {size[0]}x{size[1]}" if row['rf'] is None else f"{row['rf']}x{row['rf']}"
        lines.append(f"{row['name']:9} {str(row['shape']):17} {row['params']:>8,} {rf:>15} {row['activations']:>11,} "
                     f"{human_bytes(row['bytes']['float32']):>13} {human_bytes(row['bytes']['float64']):>9}  "
                     f"{row['kept']}")
    m = memory(rows)
    lines.append(f"{'total':9} {'':17} {sum(row['params'] for row in rows):>8,} {'':>15} {m['activations']:>11,} "
                 f"{human_bytes(m['kept_bytes']['float32']):>13} {human_bytes(m['kept_bytes']['float64']):>9}")
    return '\n'.join(lines)


def receptive_field_steps(rows):
    """How the receptive field grows, layer by layer: ['conv1 adds 4 x 1 = 4 (5x5)', ...]."""
    steps = []
    for previous, row in zip(rows, rows[1:]):
        if row['rf'] is None:
            break
        if row['rf'] != previous['rf']:
            added = row['rf'] - previous['rf']
            steps.append(f"{row['name']} adds {added // previous['jump']} x {previous['jump']} = {added} "
                         f"({row['rf']}x{row['rf']})")
    return steps


def answers(rows, fast_rows=None):
    """The lab's questions about the net answered in words from model_summary's rows (and, given, those of the
    fast layers): {'parameters': ..., 'receptive_field': ..., 'memory': ...}."""
    m = memory(rows)
    params = {row['name']: row['params'] for row in rows if row['params']}
    biggest = max(params, key=params.get)
    last_conv = [row for row in rows if row['name'].startswith('conv')][-1]
    out = {'parameters': f"{sum(params.values()):,} parameters ({', '.join(f'{name} {count:,}' for name, count in params.items())}); "
                         f"{biggest} holds {params[biggest] / sum(params.values()):.0%} of them.",
           'receptive_field': f"A feature of {last_conv['name']} sees {last_conv['rf']}x{last_conv['rf']} input "
                              f"pixels: " + '; '.join(receptive_field_steps(rows[:rows.index(last_conv) + 1])) + " (each k x k window over units "
                              "`jump` pixels apart adds (k - 1) x jump pixels; a stride multiplies the jump)."}
    saved = m['im2col_values'] - m['conv_input_values']
    out['memory'] = (
        f"Backprop at batch {m['batch_size']} needs the activations, the input and every layer's output once: "
        f"{m['activations']:,} values = {human_bytes(m['activations_bytes']['float32'])} in float32 "
        f"({human_bytes(m['activations_bytes']['float64'])} in float64); every layer's gradients need its input, "
        f"the output below it, and a view (Flatten) takes no memory of its own. The textbook layers keep "
        f"{human_bytes(m['kept_bytes']['float32'])} in float32 ({human_bytes(m['kept_bytes']['float64'])} in "
        f"float64), what each forward stores for its backward: the im2col columns repeat every convolution input "
        f"pixel once per kernel tap ({m['conv_input_values']:,} input values become {m['im2col_values']:,} column "
        f"entries, {human_bytes(m['im2col_bytes']['float32'])} in float32), while pooling keeps the indices of its "
        f"maxima and ReLU a boolean mask. Recomputing the columns in backward_params would keep {saved:,} fewer "
        f"values ({human_bytes(4 * saved)} in float32) for one more im2col per step.")
    if fast_rows is not None:
        fast = memory(fast_rows)['kept_bytes']
        out['memory'] += (f" The fast layers (fast_layers.py) keep {human_bytes(fast['float32'])} in float32 "
                          f"({human_bytes(fast['float64'])} in float64): their convolutions copy each input pixel "
                          f"once per kernel column, not once per tap.")
    return out
