"""Independent references for the tests: plain autograd, no loco_timm loss or stage code."""
import torch


def ref_nt_xent(z1, z2, t):
    """SimCLR NT-Xent written out: per anchor, -log softmax of its positive among all other embeddings."""
    z = torch.cat([z1, z2])
    z = z / z.norm(dim=1, keepdim=True)
    n, b = z.shape[0], z1.shape[0]
    losses = []
    for i in range(n):
        others = torch.cat([z[:i], z[i + 1:]])
        positive = (i + b) % n
        positive_in_others = positive if positive < i else positive - 1
        logits = others @ z[i] / t
        losses.append(torch.logsumexp(logits, 0) - logits[positive_in_others])
    return torch.stack(losses).mean()


def resnet_stage_fns(model):
    """The paper's ResNet stages written by hand: S1 = stem + res2, S2 = res3, S3 = res4, S4 = res5."""
    def stem_res2(x):
        return model.layer1(model.maxpool(model.act1(model.bn1(model.conv1(x)))))
    return [stem_res2, model.layer2, model.layer3, model.layer4]


def resnet_stage_params(model):
    """Parameters of each hand-written ResNet stage, by name."""
    prefixes = [('conv1.', 'bn1.', 'layer1.'), ('layer2.',), ('layer3.',), ('layer4.',)]
    return [[p for n, p in model.named_parameters() if n.startswith(pre)] for pre in prefixes]
