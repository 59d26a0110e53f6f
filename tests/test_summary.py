"""summary.model_summary against independent computations: shapes and parameter counts from the same net
in PyTorch, receptive fields from gradients through PyTorch, kept memory from what the layers store."""
import numpy as np
import pytest
import torch

import layers
import nn
import summary as lab_summary
import train
from conftest import torch_lab_net

BATCH = 50


@pytest.fixture(scope='module')
def summary():
    np.random.seed(0)
    net = train.make_net(layers, BATCH, np.float32)
    return net, lab_summary.model_summary(net, BATCH)


def test_shapes_and_parameter_counts_match_torch(summary):
    net, rows = summary
    model, _ = torch_lab_net()
    x = torch.zeros(BATCH, 1, 28, 28, dtype=torch.float64)
    assert [row['name'] for row in rows] == ['input'] + [layer.name for layer in net] + ['loss']
    assert rows[0]['shape'] == (BATCH, 1, 28, 28)
    for row, module in zip(rows[1:], model):
        x = module(x)
        assert row['shape'] == tuple(x.shape), row['name']
        assert row['params'] == sum(p.numel() for p in module.parameters()), row['name']
    assert sum(row['params'] for row in rows) == sum(p.numel() for p in model.parameters()) == 821_706


def receptive_field_by_gradient(model, depth):
    """Side of the input square that one central output unit of model[:depth] depends on.

    Backpropagates a one-hot gradient and measures the nonzero input pixels. Max pooling is swapped for
    average pooling of the same window (same connectivity, but every input of the window gets gradient),
    and weights are set to 1 so no contributions cancel; ReLUs pass everything of an all-ones input.
    """
    layers_ = []
    for module in model[:depth]:
        if isinstance(module, torch.nn.MaxPool2d):
            module = torch.nn.AvgPool2d(module.kernel_size, module.stride)
        elif isinstance(module, torch.nn.Conv2d):
            torch.nn.init.ones_(module.weight)
            torch.nn.init.zeros_(module.bias)
        layers_.append(module)
    x = torch.ones(1, 1, 28, 28, dtype=next(model.parameters()).dtype, requires_grad=True)
    out = torch.nn.Sequential(*layers_)(x)
    grad = torch.zeros_like(out)
    grad[0, 0, out.shape[2] // 2, out.shape[3] // 2] = 1
    out.backward(grad)
    rows, cols = np.nonzero(x.grad[0, 0].numpy())
    assert rows.size == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)  # a full square
    return rows.max() - rows.min() + 1, cols.max() - cols.min() + 1


def test_receptive_fields_match_gradients_through_torch(summary):
    _, rows = summary
    model, _ = torch_lab_net()
    for depth, row in enumerate(rows[1:7], start=1):  # conv1 .. relu2: the spatial layers
        assert receptive_field_by_gradient(model, depth) == (row['rf'], row['rf']), row['name']
    by_name = {row['name']: row['rf'] for row in rows}
    assert by_name['conv2'] == 14  # the lab's question: features of the last conv layer see 14x14 pixels
    assert by_name['fc3'] is None and by_name['logits'] is None  # fully connected: the whole image


def test_kept_memory_is_what_the_layers_store(summary):
    """Elements the summary counts = the textbook's count for this implementation, and after a real
    batch through a float64 net the stored arrays take exactly the summary's float64 bytes."""
    _, rows = summary
    by_name = {row['name']: row for row in rows}
    float_elements = {'conv1': 25 * BATCH * 28 * 28,   # im2col columns: C*k*k x N*H*W
                      'conv2': 400 * BATCH * 14 * 14,
                      'fc3': BATCH * 1568, 'logits': BATCH * 512,  # FC keeps its input
                      'loss': BATCH * 10}                # the logits
    for name, elements in float_elements.items():
        assert by_name[name]['bytes'] == {'float32': 4 * elements, 'float64': 8 * elements}, name
    for name, elements in {'relu1': BATCH * 16 * 14 * 14, 'relu2': BATCH * 32 * 7 * 7, 'relu3': BATCH * 512}.items():
        assert by_name[name]['bytes']['float32'] == elements, name  # a bool mask per element
    assert by_name['flatten3']['bytes']['float32'] == 0

    np.random.seed(0)
    net = train.make_net(layers, BATCH, np.float64)
    nn.forward_pass(net, np.random.default_rng(0).standard_normal((BATCH, 1, 28, 28)))
    stored = {'conv': 'x_cols', 'pool': 'argmax', 'relu': 'positive', 'fc3': 'inputs', 'logits': 'inputs'}
    for layer in net:
        attribute = next((a for prefix, a in stored.items() if layer.name.startswith(prefix)), None)
        expected = getattr(layer, attribute).nbytes if attribute else 0
        assert by_name[layer.name]['bytes']['float64'] == expected, layer.name


def test_the_textbook_activation_count_is_a_torch_copy_of_the_nets(summary):
    """The lab's estimate: the input plus every module's output, counted with forward hooks on the torch
    copy; a module whose output shares its input's memory (Flatten's view) adds nothing."""
    _, rows = summary
    counted = []

    def count(module, inputs, output):
        if output.untyped_storage().data_ptr() != inputs[0].untyped_storage().data_ptr():
            counted.append(output.numel())
    model, _ = torch_lab_net()
    for module in model:
        module.register_forward_hook(count)
    x = torch.zeros(BATCH, 1, 28, 28, dtype=torch.float64)
    model(x)
    memory = lab_summary.memory(rows)
    assert memory['activations'] == x.numel() + sum(counted) == 1_502_100
    assert memory['activations_bytes'] == {'float32': 4 * 1_502_100, 'float64': 8 * 1_502_100}


def test_the_im2col_columns_are_the_convolutions_inputs_times_their_kernel_taps(summary):
    _, rows = summary
    memory = lab_summary.memory(rows)
    assert memory['conv_input_values'] == BATCH * (1 * 28 * 28 + 16 * 14 * 14)
    assert memory['im2col_values'] == BATCH * (1 * 28 * 28 + 16 * 14 * 14) * 25
    assert memory['kept_bytes']['float32'] == sum(row['bytes']['float32'] for row in rows)


def test_summary_table_and_answers(summary):
    net, rows = summary
    text = lab_summary.format_summary(rows)
    assert '821,706' in text and '14x14' in text and 'all 28x28' in text and '1,502,100' in text
    assert [line for line in text.splitlines() if line.startswith('total')]
    answers = lab_summary.answers(rows)
    assert answers['parameters'].startswith('821,706 parameters') and 'fc3 holds 98%' in answers['parameters']
    assert answers['receptive_field'].startswith('A feature of conv2 sees 14x14 input pixels')
    assert 'conv2 adds 4 x 2 = 8 (14x14)' in answers['receptive_field']
    assert '1,502,100 values = 6.0 MB in float32 (12.0 MB in float64)' in answers['memory']
    assert 'keep 22.2 MB in float32' in answers['memory']


def test_receptive_field_with_strided_pooling():
    """pool(3, 2) as in the lab's CIFAR net: overlapping windows, stride 2."""
    x = np.zeros((2, 1, 32, 32), dtype=np.float32)
    net = [layers.Convolution(x, 4, 5, 'conv1')]
    net += [layers.MaxPooling(net[-1], 'pool1', pool_size=3, stride=2)]
    net += [layers.Convolution(net[-1], 4, 5, 'conv2')]
    rows = lab_summary.model_summary(net, 2)[1:]
    # conv1: 5; pool 3 over jump 1: 5 + 2 = 7, jump 2; conv2 5 over jump 2: 7 + 4*2 = 15
    assert [row['rf'] for row in rows[:3]] == [5, 7, 15]
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 5, padding=2), torch.nn.MaxPool2d(3, 2),
                                torch.nn.Conv2d(4, 4, 5, padding=2))
    for depth in (1, 2, 3):
        rf = receptive_field_by_gradient(model, depth)
        assert rf == (rows[depth - 1]['rf'],) * 2
