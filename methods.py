"""Every method, one object each: the flags it reads, the inputs of a step, its objective, its train hits.

    method = METHODS["mixskd"](net, num_classes, {"alpha": 0.4, "temperature": 3.0, ...})
    inputs = method.inputs(x, y)                     # mix: lam, perm, x_mix (docs/method.md section 1)
    total, terms, logits = method.forward(*inputs)   # the network and the loss, one nn.Module
    ...backward, SGD...
    method.after_step((x, y), logits)                # PS-KD writes its store
    hits = method.hits(inputs, logits)               # correct training predictions, on the device

train.py's step calls exactly this and never asks which method it runs. Nine classes make the ten methods of the
results table (MixSKD's two recipes are one class). Each class declares the flags it reads with their defaults per
setting (`defaults`); train.py refuses a flag the chosen method does not read (cli.py). The losses are the method
files' (losses.py, baselines.py, mixup.py, self_teacher.py); the network comes from the caller (arch.network, with
the branches when `heads` is True). docs/method.md sections 1-9 (MixSKD and the CE, Mixup and CutMix baselines)
and 12 (the Self-KD baselines).
"""
import torch

from baselines import BASELINE_TEMPERATURE, PredictionStore, SelfKDObjective, ps_kd_alpha
from losses import TERMS, BaselineObjective, MixSKDObjective, discriminators
from mixup import mix_batch
from self_teacher import SelfTeacher

MIXSKD_TEMPERATURE = 3.0  # docs/method.md section 5; the Self-KD baselines' is BASELINE_TEMPERATURE (4)
ALPHA = {"cifar": 0.4, "imagenet": 0.2}  # lam ~ Beta(alpha, alpha), docs/method.md sections 1 and 9
CUTMIX_ALPHA = 1.0  # the released CutMix baseline's (section 7)
RECIPES = ("paper", "official")


class Method:
    """Cross-entropy on clean images, the backbone alone (docs/method.md section 7): the base every method
    follows. `forward` is the module the step calls: `objective` itself, or speedups.wrap's DistributedDataParallel
    and torch.compile around it. `hp` holds the flags the method reads (`defaults`), resolved."""

    name = "ce"
    heads = False  # whether it trains the auxiliary branches (the network of model.MixSKDNet / StagedMixSKDNet)
    extra = None  # what its batches carry besides images and labels (data.train_batches): "index" or "partner"
    clipped = False  # whether a run too short for the warmup floor, or of a library network, clips (settings.py)

    @staticmethod
    def defaults(setting):
        """{flag: default under setting ("cifar" or "imagenet")} for every flag the method reads."""
        return {}

    @classmethod
    def check(cls, hp, setting):
        """A ValueError where the hyperparameters leave nothing to train."""

    @classmethod
    def stem_relu(cls, hp, setting):
        """Whether our ResNets keep the ReLU after the stem (docs/method.md section 6, item 5)."""
        return True

    def __init__(self, net, num_classes, hp=None, setting="cifar", memory_format=torch.contiguous_format,
                 train_labels=None):
        """train_labels: the training set's labels on the device, for a method that keeps a row per image."""
        self.hp = {**self.defaults(setting), **(hp or {})}
        self.setting, self.memory_format = setting, memory_format
        self.store = None  # what a method keeps per training image (PS-KD's predictions)
        self.objective = self.build(net, num_classes)
        self.forward = self.objective

    def build(self, net, num_classes):
        return BaselineObjective(net)

    def inputs(self, x, y):
        """The arguments of `forward` for a batch of the loader."""
        return self.images(x), y

    def images(self, x):
        return x.contiguous(memory_format=self.memory_format)

    def hits(self, inputs, logits):
        """Correct top-1 predictions among the batch's training images (a device tensor, no sync)."""
        return (logits.argmax(1) == inputs[1]).sum()

    def after_step(self, batch, logits):
        """What the method does with the step's outputs once the optimiser has stepped (batch: the loader's)."""

    def set_epoch(self, epoch, epochs, floor_from=None):
        """Called before each epoch (PS-KD's alpha_t follows it)."""

    def logged(self):
        """The method's own numbers for this epoch's line of metrics.jsonl."""
        return {}

    def notes(self, epochs):
        """Lines a run of `epochs` epochs prints at its start."""
        return []

    @property
    def unused_parameters(self):
        """Whether some trained parameters get no gradient (DistributedDataParallel must be told)."""
        return False

    def describe(self):
        """The method and the hyperparameters it reads, for the run's header."""
        shown = {"recipe": "{}", "mix": "{}", "alpha": "alpha {}", "temperature": "T {:g}"}
        words = [shown[k].format(v) for k, v in self.hp.items() if k in shown and (k != "mix" or v != "mixup")]
        words += [f"{k} {v:g}" for k, v in self.hp.items() if k.startswith("w_") and v != 1.0]
        return " ".join([self.name, *words])


class Mixup(Method):
    """Mixup: the mixed CE of Eq. (3) on the images of Eq. (1) (docs/method.md section 7)."""

    name = mode = "mixup"

    @staticmethod
    def defaults(setting):
        return {"alpha": ALPHA[setting]}

    def inputs(self, x, y):
        x_mix, perm, lam = mix_batch(x, self.hp["alpha"], self.mode)
        # lam goes in as a 0-d device tensor: a new lam neither recompiles nor syncs
        return self.images(x_mix), y, torch.full((), lam, device=x.device), perm

    def hits(self, inputs, logits):
        """A mixed image counts lam for its own label and 1 - lam for its partner's."""
        _, y, lam, perm = inputs
        predicted = logits.argmax(1)
        return lam * (predicted == y).sum() + (1 - lam) * (predicted == y[perm]).sum()


class CutMix(Mixup):
    """CutMix: Mixup's loss on the images of Eq. (1'), alpha 1.0 by default as released (section 7)."""

    name = mode = "cutmix"

    @staticmethod
    def defaults(setting):
        return {"alpha": CUTMIX_ALPHA}


class MixSKD(Method):
    """MixSKD (docs/method.md sections 1-6, 9): one forward over cat([x, x_mix]), then Eqs. (5)-(10) (`paper`),
    (10') (`official` on CIFAR) or the released ImageNet objective (`official` under the ImageNet setting)."""

    name, heads, clipped = "mixskd", True, True

    @staticmethod
    def defaults(setting):
        return {"recipe": "paper", "mix": "mixup", "alpha": ALPHA[setting], "temperature": MIXSKD_TEMPERATURE,
                **{f"w_{t}": 1.0 for t in TERMS}}

    @staticmethod
    def optimised_terms(hp, setting):
        """The terms a recipe optimises: all five, but L_mix only logged under `official` on CIFAR (Eq. (10'))."""
        return [t for t in TERMS if not (t == "mix" and hp["recipe"] == "official" and setting == "cifar")]

    @classmethod
    def check(cls, hp, setting):
        terms = cls.optimised_terms({**cls.defaults(setting), **hp}, setting)
        if "w_mix" in hp and "mix" not in terms:
            raise ValueError("--w-mix weighs L_mix, which recipe official logs on CIFAR and does not optimise (Eq. "
                             "(10')): drop it, or use --recipe paper")
        if not any(hp.get(f"w_{t}", 1.0) for t in terms):
            raise ValueError(f"every optimised loss weight is 0 (--w-{' --w-'.join(terms)}): nothing to train; "
                             f"recipe {hp.get('recipe', 'paper')} optimises {', '.join('L_' + t for t in terms)}")

    @classmethod
    def stem_relu(cls, hp, setting):
        """The released CIFAR network has none; the released ImageNet network has it (section 9)."""
        return not (hp.get("recipe", "paper") == "official" and setting == "cifar")

    def build(self, net, num_classes):
        # the released ImageNet script optimises L_mix, its CIFAR script does not (section 9)
        official = "official-imagenet" if self.setting == "imagenet" else "official"
        recipe = official if self.hp["recipe"] == "official" else "paper"
        channels, heads = net.feature_channels, len(net.branches) + 1
        return MixSKDObjective(net, SelfTeacher(channels, num_classes, heads), discriminators(channels, heads),
                               recipe, {t: self.hp[f"w_{t}"] for t in TERMS}, self.hp["temperature"])

    def inputs(self, x, y):
        x_mix, perm, lam = mix_batch(x, self.hp["alpha"], self.hp["mix"])
        # clean and mixed images in one forward, so BatchNorm sees both (docs/method.md section 2)
        return self.images(torch.cat([x, x_mix])), y, torch.full((), lam, device=x.device), perm

    def hits(self, inputs, logits):
        """The clean half: the backbone's logits on x (the first len(y) rows of the 2B)."""
        y = inputs[1]
        return (logits[:len(y)].argmax(1) == y).sum()

    @property
    def unused_parameters(self):
        return any(self.hp[f"w_{t}"] == 0 for t in TERMS)  # a zero weight leaves its modules without gradient


class SelfKD(Method):
    """A Self-KD baseline with its released loss (docs/method.md section 12): baselines.SelfKDObjective."""

    def build(self, net, num_classes):
        return SelfKDObjective(net, self.name, self.hp.get("temperature", BASELINE_TEMPERATURE))


class LabelSmoothing(SelfKD):
    """Label smoothing, eps 0.1 as released (section 12.1)."""

    name = "label-smooth"


class Distilling(SelfKD):
    """The Self-KD baselines that distill at a temperature, 4 as released (section 12.0)."""

    @staticmethod
    def defaults(setting):
        return {"temperature": BASELINE_TEMPERATURE}


class BYOT(Distilling):
    """BYOT: the branches learn from the backbone's logits and feature map (section 12.2)."""

    name, heads = "byot", True


class DKS(Distilling):
    """DKS: every head learns from every other (section 12.3)."""

    name, heads = "dks", True


class CSKD(Distilling):
    """CS-KD: each image distills from another image of its class (section 12.4), drawn by the loader."""

    name, extra = "cs-kd", "partner"

    def inputs(self, x, y, partners):
        return self.images(x), y, self.images(partners)


class PSKD(SelfKD):
    """PS-KD (section 12.5): soft targets from the previous epoch's predictions, kept in a store of one row per
    training image (the loader gives each image's position), weighted by alpha_t."""

    name, extra = "ps-kd", "index"

    def __init__(self, net, num_classes, *args, train_labels=None, **kwargs):
        super().__init__(net, num_classes, *args, **kwargs)
        if train_labels is None:
            raise ValueError("PS-KD keeps one row per training image: pass train_labels")
        self.store, self.alpha = PredictionStore(train_labels, num_classes), None  # alpha_t: set_epoch

    def set_epoch(self, epoch, epochs, floor_from=None):
        """alpha_t of this epoch of `epochs`; floor_from (epoch, epochs): an extended run's last epoch before
        its extension and the epochs it had then, below whose alpha_t this one never falls."""
        self.alpha = ps_kd_alpha(epoch, epochs)
        if floor_from is not None:
            self.alpha = max(self.alpha, ps_kd_alpha(*floor_from))

    def inputs(self, x, y, index):
        """The soft targets of the batch's images, read from the previous epoch's rows of the store."""
        return self.images(x), y, self.store.targets(index, y, self.alpha)

    def after_step(self, batch, logits):
        """This step's predictions into the rows of the batch's images (batch: the loader's x, y, index)."""
        self.store.write(batch[2], logits)

    def logged(self):
        return {"ps_kd_alpha": self.alpha}

    def notes(self, epochs):
        if epochs == 1:
            return ["note: PS-KD learns from its own predictions of the previous epoch, and a run of one epoch has "
                    "none: its targets are the labels, so this run trains plain cross-entropy"]
        return []


METHODS = {cls.name: cls for cls in (MixSKD, Method, Mixup, CutMix, LabelSmoothing, BYOT, DKS, CSKD, PSKD)}
FLAGS = ("recipe", "mix", "alpha", "temperature", *(f"w_{t}" for t in TERMS))  # every flag a method may read


def readers(flag):
    """The methods that read a flag, in METHODS' order."""
    return [name for name, cls in METHODS.items() if flag in cls.defaults("cifar")]


def without_foreign_flags(values, method, setting="cifar"):
    """values (a dict of flags) without the method flags `method` does not read: a run saved before the methods
    refused them recorded every method's."""
    reads = METHODS[method].defaults(setting)
    return {k: v for k, v in values.items() if k not in FLAGS or k in reads}
