"""The CPU kernel alone on one random layer batch, with parts of the distributions switched off.

    python benchmarks/bench_kernel_parts.py "histograms,density,sampling" "" "density,sampling"

Each argument is a GLUSCOPE_BENCH_SKIP value; prints the min and median of 12 updates (process time, one thread).
"""
import os, time, sys
import numpy as np, torch
torch.set_num_threads(1)
from gluscope.recorder.reducer import Batch, LayerSetup, make_reducers
from gluscope.recorder.model import activation_function
B,T,n=8,512,1408
xg=torch.randn(B,T,n); xi=torch.randn(B,T,n)
lengths=np.full(B,T)
setup=LayerSetup(k=16,before=24,after=2,sign=torch.ones(n),act_fn=activation_function("silu"),text_lengths=np.full(1000,T))
os.environ["GLUSCOPE_BENCH_SKIP"]=sys.argv[1]
(r,)=make_reducers("kernel",[setup])
ts=[]
for i in range(12):
    batch=Batch.of(lengths, np.arange(i*B,(i+1)*B), torch.device("cpu"))
    t=time.process_time(); r.update(xg,xi,batch); ts.append(time.process_time()-t)
print(f"{sys.argv[1]!r:32s} min {min(ts)*1000:.0f} median {np.median(ts)*1000:.0f} ms")
