"""The grad_sample views' scaling pass (make_private(grad_sample_views=...)): one DPDM step (MNIST net, B=16, K=8) with
the views on and off, interleaved in one process: python bench/views_cost.py"""
import statistics, time, torch, warnings
warnings.filterwarnings("ignore")
torch.set_num_threads(2)
from dpdm_fast.benchmarks.engines import WORKLOADS, make_batch, C, LR, SIGMA
from dpdm_fast.engine import DPOptimizer, PrivateModule
B, K = 16, 8
steps = {}
for views in (False, True):
    torch.manual_seed(0)
    net = WORKLOADS["mnist"].make_net()
    loss_fn, rows = make_batch(WORKLOADS["mnist"], B, K, torch.device("cpu"))
    pm = PrivateModule(net, noise_multiplicity=K, max_grad_norm=C, grad_sample_views=views)
    opt = DPOptimizer(torch.optim.Adam(net.parameters(), lr=LR), pm.collector, noise_multiplier=SIGMA,
                      max_grad_norm=C, expected_batch_size=B)
    def step(pm=pm, opt=opt, loss_fn=loss_fn, rows=rows):
        loss_fn(pm, *rows).mean().backward(); opt.step(); opt.zero_grad()
    step(); step()
    steps[views] = step
times = {False: [], True: []}
for r in range(6):
    for v in ((False, True) if r % 2 == 0 else (True, False)):
        t = time.perf_counter(); steps[v](); times[v].append(time.perf_counter() - t)
for v in (False, True):
    print(f"views={v}: median {1000 * statistics.median(times[v]):.1f} ms  runs {[round(1000 * x) for x in times[v]]}")
print(f"ratio on/off: {statistics.median(times[True]) / statistics.median(times[False]):.3f}")
