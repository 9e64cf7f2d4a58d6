import torch

from attnlab.bench.memory import peak_memory


def test_peak_counts_live_tensors_not_their_sum():
    def work():
        a = torch.ones(256, 1024)  # 1 MiB
        b = a * 2  # 1 MiB, both alive: peak 2 MiB
        del a
        c = b.t().contiguous()  # 1 MiB more after `a` was freed: still 2 MiB
        del b
        return c

    out, peak = peak_memory(work)
    assert peak == 2 * 2**20
    assert out.shape == (1024, 256)


def test_views_and_preexisting_tensors_are_not_counted():
    x = torch.ones(1024, 1024)

    def work():
        y = x.view(-1)[:10]  # a view of a tensor that predates the measurement
        x.add_(1)  # in place
        return y.sum()

    _, peak = peak_memory(work)
    assert peak < 1024


def test_attention_scores_show_up_in_math_attention_but_not_in_sdpa():
    q = torch.randn(1, 2, 1024, 32)

    def math_attention():
        return torch.softmax(q @ q.transpose(-1, -2), dim=-1) @ q

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(q, q, q)

    _, math_peak = peak_memory(math_attention)
    _, sdpa_peak = peak_memory(sdpa)
    scores = 2 * 1024 * 1024 * 4
    assert math_peak >= scores
    assert sdpa_peak < scores / 4
