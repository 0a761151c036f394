"""Image-folder datasets: registered photographs (train400, set12) and a user's
own folder of images, fetched into the download cache and cut into patches.

A registered dataset is a list of file names with canonical sha256s (those of
the DnCNN repository's files, as mirrored in ``../shared/datasets``), fetched
from its origin or a mirror exactly as an IDX dataset's files are. A user's
folder is a path, ``file://`` or ``http(s)://`` URL; a ``SHA256SUMS`` beside
the images (``sha256sum`` format, paths relative to the folder) names the files
and their checksums, and over HTTP it is required, since HTTP cannot list a
folder. Every image is decoded with :mod:`denoiser.images` (the folder
denoiser's reader: same formats, modes, EXIF, limits) and kept as grey uint8
(its luma); a file that does not decode is reported (logged, and listed under
``skipped`` in the dataset manifest with its reason) and left out, which is
fatal only when no image is left.

Splits are decided by each file's content (its sha256), never by its name or
position, so adding a file to a folder moves no other file between train,
validation and test. Training and validation rows are random square patches
with one of the eight flips/rotations, drawn from the shard's seed; test rows
are whole images of any size. Noise is not stored: the training graph adds it
to every batch (the shard manifest says so with ``"applied": "in_training"``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from denoiser.datasets import (
    _cache_write_error,
    _cached_file_problem,
    _is_url,
    _open,
    _stream_to,
    _write_json,
    locate_source,
    normalise_source,
    parse_sha256sums,
    read_sha256sums,
    remove_orphan_temps,
    temp_path,
)
from denoiser.errors import ChecksumError, ConfigError, DownloadError, ImageError
from denoiser.files import file_sha256
from denoiser.images import IMAGE_SUFFIXES, decode_image

logger = logging.getLogger(__name__)

DEFAULT_PATCH_SIZE = 40  # the literature's (DnCNN) training patch
DEFAULT_PATCHES_PER_IMAGE = 64
HELD_OUT_TEST_SHARE = 0.1  # of a user's folder, when no test dataset is given
SUMS_NAME = "SHA256SUMS"


@dataclass(frozen=True)
class ImageDatasetSpec:
    """A registered folder of images: where it comes from, what it holds."""

    name: str
    origin: str
    sums: str  # ``sha256sum`` lines: the canonical checksums
    test: str | None = None  # the registered dataset to test on
    description: str = ""

    def files(self) -> dict[str, str]:
        return parse_sha256sums(self.sums)


_SET12_SUMS = """\
079229e13faff0a262a9d3eb9a7fa60868203f9b8545de6fb75aadf6fbca4296  01.png
576b2b3b6ff4d7e6c8ddccb0df645774f9b986c81219c28e16ba1935990a0b29  02.png
92de94d7b8ef9e645546821150eff5c765d0d29666f9bc7d20b61063f35c3305  03.png
839fb4770a5a71ab80f18b04a3521b7464451bb3d3e3c6555d538247599fe843  04.png
1707ee6fd18fe7d55a1ac7a2cc8818b1e5d5c4a1d6974d8cd4acc9e0f11025fc  05.png
02d125470b396b2c63fa428e65920a88e721d5558c54a5c0d25075c934bd0469  06.png
83d42aae735bde17c8e92e5c2544b07dd4ff2b77caaa64f5d3bcc34668f79597  07.png
f07124a0b4bb493660210c209070aa9c9187e9e085a9f026a51a2b9f57e25f15  08.png
764b8a2748cc7ad381cccc047c5e512cb528c197ba86adb83aa339e8932e66c0  09.png
18bea4de1634456f5791d16301863fc974401d144cd6afb86f09a6be4620fe54  10.png
a8791afbd2af4f977f30c3a9a72a50204264440c27b1f4bb282a085eb680abe1  11.png
f6acd12953db8c1f5a0dda53fef4233be37a61702cd22d5be742cf7c039021f2  12.png
"""

_TRAIN400_SUMS = """\
b6b7c09f4c2bc003b83d430e57907e6dfba146b8d076c7e88d5465452b59142d  test_001.png
a2a025c95437dbf27012e937254f39cebf4e86af6218219977447223a0696170  test_002.png
af54c395f444125074eadf2e468ca0e0291cc98df0b728e99e3fa3b9e7b63af7  test_003.png
26ba134a51a1507b3c85020efa7e2c721e38f65a63b3ef142e804a842834bab2  test_004.png
6d6cde02142c0db34e7d5d512726b4768ce84aa63a21a5a40bcbb82bbcc56be5  test_005.png
c48e14bf34d0162142533ab8445e0672f05bc0ef0c21c5c63644b95e4d659646  test_006.png
9f57dc4045d57707c2e4d3f3c57b4a52309067a5770efde1e7c961dd602780f7  test_007.png
dfabfae4683247e5dcdc743ea32e038fabe8fc4845d8371259a6cf3278524c41  test_008.png
cd70efbc2d9cccf3e44dc6e5bb384ccc719a3dbe91abcd83d731f893b76967b9  test_009.png
4f8e9c5cb5fa53d2ab7d566d7cca44a9f4ba0f0ba5e284d71047ea083600eadd  test_010.png
d475a0ce9c7dfe2905d395b0a7099341ba12de72c155d6ffc3b333e4e99f4508  test_011.png
08f0ca89c001c36dda41330c57226ec7e5437f075f867fc7b1b391d353c28286  test_012.png
46c7875aed4668d83287c6bae4ec6f481f61404a667610f009cd7d1f85141ed7  test_013.png
e50f1229d0e235aa7b9d15af060668cea186f65d8d9dc995baa9b461b3fd157b  test_014.png
407476f84c115cc11fbebb911329c8c394586d06d9ba9a11a700f57d20776687  test_015.png
c0b0a81f02754ac7e25633a6944165845af0fe48bc1593dddbac5063a9d053f6  test_016.png
f11984dae07e2c7a748dc8cc91ddbff86bab310ad4e2093e9553e040964cea79  test_017.png
0f485c4c4ac423f8ec9726a5bb32df7fb5d0b24a779782458306f5a7621a2bd4  test_018.png
072b6e8d36b354840d51c8a9e552672b58be7795702915ef32256380a62bb5a7  test_019.png
9a7f22403a4a5f15a16fc49ec9fcd3cacf457f9889d3ed5471fd65f847add4bd  test_020.png
a713039003a392891faeab0892417298e384a2d3ef88ce6d9bf10e1a850bba71  test_021.png
0e55e61ae0d5f90d8256baadc013a34ada6f26113ae824aaa7a685a355cd1f37  test_022.png
2e4449d2ccf2f68197f671518097b5226a051770e358701fefa4f573ba3daf33  test_023.png
a690685ee6977200be0c22f9b65fc920b4311210c1050f600dbca230665a7cc4  test_024.png
682b5edefc997072274185f6f9722a283b288f1c13e001ff2aad57d02128eafe  test_025.png
05899fdcd7c1a75d8900d3fa9893e604aff09cf43bf0a958262a87e79b95cb5c  test_026.png
d315221dbb70b99a23affa37ddbd1e34ae3c5f1842db65aaee2c0f0e1f286b19  test_027.png
13eb0a57db578c4ac36718f3e1527317f978ddca5c1b17df84340f2d39f9aa0d  test_028.png
42af05016b0cc4ecb1ce8c00a4b0daa8ca8676b576c80b22aad5369a1d3d855b  test_029.png
6fbaa187afea029acd403e9ccd2687aab890ea8d8fd0c77f9819c2a01989be3a  test_030.png
e346ed32d4c45abf15316bb46a4a460658171896eecedb9a407c412d11c2d651  test_031.png
433d1c44de3494792168fb99a8b23fc086fbd9961806a6fd7da1aee508e18e14  test_032.png
cc9cb57be50fc9f6cc17b74b4ca1247e0cb6fed1fbe62b3efca7290cfa984e10  test_033.png
2b715a44ee45aba9baa8f64c30078d8641e49157d09e77f2c493bc2566575269  test_034.png
a8d0312cd034eb8a9a64440ec3d4b8f7fb918e4acb6bd7455fe2f658a4300ef6  test_035.png
a81d8531488ca5dde5f13df793e3cde927cb42126ce64c99e43f57e1f0ccf259  test_036.png
0e07e730e471fd1c7bdf6b38c20c3e5e78746862eaf6c0b7492ec0fe78211cd7  test_037.png
43b29fcc76d02dab884998d82f613bb28ddcbb05598c9f19ac9a28b53bdcd596  test_038.png
d0a943e09f09112f4a78b47895fc9fc835a435f2f68493b2416fd3972669943f  test_039.png
b1ee2969c57f3dfdc886ed1f4854f5e4129f8e12bfdcf9cc76ad5ddf5588b7ad  test_040.png
c7ad4d796437b6128995fd3dc3baa51340335be1b4acba6de53fecee9bb6105b  test_041.png
66ec1ec87c4a2be0b86277d741becc34e08c276a7559b6cc63cdfb17eb5846cd  test_042.png
60b21683a2e8088b86bf81ab8c4aedd0bf9c5c5aa36416ce3cbdb8b171bb5680  test_043.png
36e046af813d2dc66dad70f62de21c717290ced182f1a14776e28e26e6624b33  test_044.png
a219e1d7b3950578237c45cebf72cbe83351fb33327e16420095d9bc0a6c84c3  test_045.png
e8063fb3a416b13a0f0012c35683d02ff60394726087f4984985aa25a41eb479  test_046.png
58ccc3d4852dbd42679c9183e8444d2ba7ed1769a5047bd118bd16c6e091ae89  test_047.png
50984aad72149e6f14021a7161cb37e8a004eac7f9acfd7194121d2c17dacd5e  test_048.png
2723080b4001db359f2042eaa5750f3e63e322f43bde79ae1bdfe00cdeacf968  test_049.png
88473640c7431d13d6f665c02e64cf302123e390155d1b56c2a62b22180d32a1  test_050.png
8eeb82ca47ff8cd5ecb491b8ec10ce3b6528275f765f732b9b71e6a3c08c52e4  test_051.png
75b8701a1a5ec9ef50bd3f3fd2b5f9c0198b0420aceec540e96c93d715b0355f  test_052.png
0f8255995960a27ecea8478c13a90b6a39056764cf00de894e54a3fcead2087b  test_053.png
06278bc9f7e404ea7fa127d7b5bdc2348a342d243e6d4f11faee52e6034d9336  test_054.png
f46d988f0b7d860240d47f6a79a725b43eb8cf84bd8fbe59e58cffb5d3cb2adf  test_055.png
9c57a0d0bdb9f0647fabbc2cd87b0015fa87c00997efbeb69ff7614a109d3e73  test_056.png
3d3c40b0a8d34881fabd12564496cb7ee3f106331483c1e1d8576d211682603a  test_057.png
f7a2df5447e10452271ffa7cfba546142025452c524a63667e0b497f03f450ef  test_058.png
c6cb79d800029dc824080fdc6bd29ea72b539e08ee66d487aff49695ab6cfdbc  test_059.png
8c021857c4b228924039ae3082b685c55b984070c5b6cc2920bb3e008c6c36f4  test_060.png
0411d224fc790d638e7a12902b271c58d5527ade69523152ae9c84b004b99ee0  test_061.png
5bcbd1af5d7e1b918696286d06c47faeb63815aeff4fb718f73ee8e694c49aac  test_062.png
72f1ebda8c58c35ef18db02b5c2784c2ddbbf32782bba789b205ccf2ae308f47  test_063.png
20cdf7063e6c0df62cee409ec0df2089aecc732e677ae67999d2858efdb381ac  test_064.png
7087a6d6b42c3241df450cabaf49364f7f4122985d7db13481b41a3faa11f2f4  test_065.png
43158c912a67717857f3f0d34b74b5249051b2023d86b7be26ec0687873e827d  test_066.png
84c40e7375ef1b31d48962fc079fdbf0fc58f0d8d1e9487eea70dd96a68b28ac  test_067.png
1d00b85275c5ced0891708ae2a45b1ef302db20573c5fc8c391bec8243671927  test_068.png
b689567cead17112e75e58bcaafb16a3bd274cee4adba8ed36023b1ed12d262e  test_069.png
4c32c4e45e37c17480786cc7fd48cdd3d848257fa04afb3cf7f2ea2f42d5d156  test_070.png
86c12a6840a323040db3acc6302b4934edafc76bdc65a162236a0fd70699027e  test_071.png
c10a54ac9aecbe612b8b4f8f1b4f6c00b8cfa39bd0a0143c1624a5695946ca05  test_072.png
0429923469afb9cbffa3d9f3c88e953534ed0b107dae6e687c3c2b67fbafd02c  test_073.png
ec98a84298ff0b7486b459242aa4e05bb5a86580f34fea46f5662b710c7f1618  test_074.png
5cb88370a7637d67a0453e285998ee3b910a2b1a879edb5ff384527f2645b729  test_075.png
bb860989cc91c46b006cb7cb7b80a48ef09e5e04c74d6be338cce85f9313d810  test_076.png
4126f2ca916687f77072c26dfae433fe58cad278814019cf77a034275e928b80  test_077.png
ee041ad982ca5edb32dde6bddb16c0f05a63430e5890845a056adaf66891cb15  test_078.png
f4d38d1e115a0cba3e437f5ce457000bbd35339de84a2b426b2fdbfc89ddc654  test_079.png
8e5374ac12d97334fe912d6e5d61bacbb2eec4ccb8c1ccf1242c0fefd35a944d  test_080.png
270ccd1350b131d46b40f36d8fc5cd24ef8698de447e86367cc908006720dc32  test_081.png
a8a25cdb29a939bb95adbb5a2c7e3b8361561aa0775da9016b33300b32419e1c  test_082.png
31c213e7f63d02e9c3d47c83a8b3739e0b0d260043681b4c7a16ce900c04632c  test_083.png
428e9ead46159c92dd8284091a32c5cbaa61dc26b309f2f72d952d476ab21b22  test_084.png
c6a374f40f5ab3c495c7eb30b566fa9ec1fa5db4780446caaf75f478aab32a27  test_085.png
c1fe5a52b84bd2d3fb2a18e0a7a0279317dd83f5b7c4f9af1ac53b1c769ea1e1  test_086.png
ec93b0052c4b6b430c7a02ecf1bdc9edf6158b053e473af4a3888b21e949ec45  test_087.png
2e45da55c9d9cfe21bb3b9fcb11f18b4c55620d3586dd0d466b6d21da053e7c4  test_088.png
dd1e78971eba04ae959f3d0fc954ef56d6e8037eceb7b9003bc6d005d7372edf  test_089.png
afe6492c2a52793f21eb546875b0e777ede2ae0822cce67985c4a8d236d1c7c3  test_090.png
e61078c098ca348f4e963276f2a488ff23184c1800f993c35caa8d6ed5bc28c5  test_091.png
6cbc2b23c85dd4e81c9773f6d6a6a3d6bae987e2f103cc61f8a70cc82e62dc6e  test_092.png
87b2a0bd892a53b6c4da298488ae17ac8f489daf3c3464c8844b0d5e439d5212  test_093.png
2a5a94602a1863359ba4ed85301fdb2e34279efed3d7f97d6c25bb7fdf9c0aa1  test_094.png
86684e72c32114879767c8eb859d7d7b8ba7d9dca0f8443b768e59072666448b  test_095.png
b7b291d554ac113e5b862076824204a2000c5014f66a23b19445301c880ed230  test_096.png
bad78451a08e83e52add43e1d29b88b6b7cc08a8d36bece9e68d4a1f6c4692bd  test_097.png
697f2650e4c5bba96faa21955ef60339006c039c564a4f44919f1762a5cda5d1  test_098.png
04d91f861b57e224f03010484dcf121ce4f8450a29100d5c85873c24f46426be  test_099.png
a661486bd38c9cecb8aeae9e4a0aa8b7f7040b05e0253aa5240c820ed539f8ba  test_100.png
8a536e578ef2d5c0d0b5eca9d5fe527c57682ebdf4f22a207c869d212281f108  test_101.png
ede57a7cd978b82492f77f9a09da4aefb8063971615701a05ce45e10a86926f0  test_102.png
af5eabfd7338e239d86a65774a8a15158d7cfd74b64944cc652e13e9d102b5aa  test_103.png
eae40d99d176eea7be3f7a81f10c3b7ba683b0d6e52afcf7c21ed24ec02dbeb1  test_104.png
9e11b8c0c0e79366f82b97df1f3f9a8ff95aab0759f2615444e943774eac60b9  test_105.png
b6131731f62ad860aec721329d69fc46a8d89daaac98ceea89168cd18123ffde  test_106.png
a45fc7fbb4c0cda4ad6cbb2825bb162ba89fc9ab2e02c3ea3d4db6276cd0294e  test_107.png
c53c0b1004a318a9cdf797bedd4803a8a774afbf777e446c2d8146970423c1f4  test_108.png
79fee913b5af75385f89d87db4fe89991e88fe182a6d42900bc82ddef40e08f6  test_109.png
be0ce69f0404da51bed4730316221dc3496049c10d78f952275bf17be13acf9b  test_110.png
f926c4dff282e48f5656c72c943ab8a744eee363c220a28a57b4769589bf1277  test_111.png
a71cb1df7ecd3dbe52fc7b7bf2713e8ebe65f2fa99dfe1ed7269bebd71537062  test_112.png
52243a6632fd10cebcc4c5b3d2360384a0b7537236024a4eaaf2813f180acfdc  test_113.png
cb1c6a3b52ba8adef6c11fc150cefe46f1a7a48b33ded9c8db06ad31d8b8ac65  test_114.png
cc77657de3ed6143ab2d5ee5b3760c1ac0058f1fdedd9151ee729a79e3872e53  test_115.png
3a0f21319ab83e6f46bb40ed9eea259e79adc0737c95b1654ce95b518f29ac19  test_116.png
99b2a7544f0461ffff5a519be420976f18d9963eb40842413b7a180257631d97  test_117.png
cbea6e8e8ba191a5d4ddef5d0694b761b084374bfbf926612c949e1449b36f51  test_118.png
bdb238b48d90710dcb851eedc46652a61308966a94357440e53cdd90a74d7298  test_119.png
e7a9fedaa6270f0108f035463d25e61b723ebdd050cf6aaa30a3b04449a941f4  test_120.png
e052a45f4541524f99793a870df8155d48bcff56675442d678c872ddcd16ac64  test_121.png
2544a5411259b9ae0997103816ca9f1d62c1ceed1aa88a2140678deb7ec7c664  test_122.png
c67f6a0b82c3d85ff64b8402b1e961bbd260e4f137541a51c1a6c311fe89a254  test_123.png
a6cff73900aae65a5d0246ea85046f339afcf57b72e9d3eec7e6454ebc47ca2e  test_124.png
0a3c5813647b7657dd6dab01ca070c601ca58e2dec804280e6fc8ff66dbf1516  test_125.png
01be1f41619e4542ace555dd01fbb0f5e228d544779287cf3c7c735e49f98b58  test_126.png
ea960a8e929f2a09144f626f5f65bb05661ff685bf29ca605df1186e87194282  test_127.png
8eec9e28bc7fedc93bf6ebff3ef6d2a10e979b182b503e346124f31ac790a326  test_128.png
7aa1ef327b9391d92b819f99998eb1727d4b397ecef45f4f820bf129011e2d26  test_129.png
f0492f7d6628c31a2c43208bfd48777aea16aac3a1e0cc53c66edb164f96bca1  test_130.png
077764babc17b8001937e70d882c1ebaffd99a45bf677f6a95e16d10a4e94473  test_131.png
896b5f25b8bec9fb6dabb76a96a6eeed92c8ee2e7d2cfbc9954a3b31c4e9826f  test_132.png
944eb6f7a6c99e10c6f071aa4213ac69cb425805b6a8443301b23ea29a32a966  test_133.png
5e0070c84f78bf93a47e51b3e7867163f246cdb56d49b181c84adc7e69fa1841  test_134.png
c0b8817e2c05ca9e90ded66b5e1b44dac5b088a36f25cfee4a7367858fd65d9c  test_135.png
ffb83f3855396031bca85130bca41bb1bddbab13cfc35f588b8719dd3a844c97  test_136.png
4dd82852e0de3470b45a80ca7a5f42814e323fef5aa35b3607adfb7165a26202  test_137.png
b1657b928c22bef525c4c61b99baeacfa43a51b2906dc29510ac3ed8a10f7b8d  test_138.png
0e3376f8d465fd67f4f9d031c32d5148fba1eff7d0a6391eb92f63cbd7588d29  test_139.png
f9eb5124130eb755f6bf33603a989faf087e9fcb1fa76e4eef8d34f3f2009f18  test_140.png
a7cca3c3302346396d6f2055935c20541da13a6b55fbaf6875a4f565b20d3bf9  test_141.png
f22b8e042f8762a17027cefd077f807297d30b1092d2231fbbf96b58beb23c8a  test_142.png
c388351c69de1e4b7d3b3db50979cc8ded05615c0195c4992b003e731811301f  test_143.png
21d373744d66bd16fc17e11d3ef91698ab84593f4bc1d579a5ecf91d02f38744  test_144.png
cc191d3b2d885d30dc86c5d867fd37a8f1b1ced0b7344996bbf6efe1b7a62c85  test_145.png
27255ef374edd8978eaa467443c61412d80b0ee8e6ba856927d6ea8d4b245e4c  test_146.png
996e78ccb5a50545403878a6aaf095a8971b4c2ff886b0eaf476a660a972682f  test_147.png
2e5e0210a70ca7ea15a6714ee3d70c98d13028f766272961bd9d29b6dbaa1d13  test_148.png
11ecc90491d8a663d9221a9227f20ee235e7558f7515453fc83065eb24b6c71b  test_149.png
9a3b6314ae6683e87dc43e72d65565e7fa6d83f42e7eb50ae244e949d05ae7c7  test_150.png
1a39b5abc2cd2af0b3d7f939f6674c1e9e663bd574a77e0b660e2367795bab72  test_151.png
038a3613ffa07bebedfad8e14f7dd0b0bc43f5b3952637c0678e0901350cccb2  test_152.png
d33fe0e1ef8bff545f5c360a9b18071dede77fb68f991579e16a53b16d80335a  test_153.png
9c927ad46d490a4d622998b98c6b8cff940917f5032848273e50565125256f37  test_154.png
e132811db4319de263ecaef9901ec73749d25ba7871a801baab22a5dc57754fd  test_155.png
0d0c91b5e26c5ed9a7d1a60297d43758920b894ff3d405f9ed1d7d590537dad7  test_156.png
bac1906669a4b720ba8de2a3201dc16e4d6a5f19fbc8b0352778032afeb75f28  test_157.png
24671f10967db42d3bface35347178cfec1ecaaaab6a40e865d3bd727bbec181  test_158.png
b3dfe9d1d3f2ab399d6f9c6c689681c4dcb486ca34c3babe29f8d21c3c97bf08  test_159.png
abca8fba04db73f867bc9aa6a08bbd560a155463c8e9b08d93dca7b69713ece2  test_160.png
2d35793a6214c702d6dd2de6d2ce2a62a3fa346e5d058325ca2d84cc08c7e5a3  test_161.png
a8b88bb0aa7cf4def342d09f4104bfd6e411e92ebc6dd271f5ea15ce1c8f874a  test_162.png
203528fc70e7d00a21999574cdf14bb10a77a93ce5240eed35ae201c7060ef45  test_163.png
5807cb7bd9e3fc3494fe44164af07cc318527f927ac4acb3fab1f16c1cb978c3  test_164.png
972fa1fb098c33e501dfeeffe89940afb8eb2d7f09e15e697f4beb93923addae  test_165.png
924f6e29610d341cbe633bebcccb2440b5aa7d16beeebe0aee2074db19758354  test_166.png
547039e2c74f6f5980e8f457a71be84552f358c049478dda6ccbc897db286153  test_167.png
e52dc4e75acadedd7e87c5e46dfee5c7346094585edda738c28ec0c865485d08  test_168.png
8c14c59a2b08133acb7b1555792b82588e89c355b7f38b628fd59e5f9caa1496  test_169.png
f1e9e052f28032e1bc9f82c0ec5f752704d0bddcc091b08be61470af106fe770  test_170.png
2ce3729a0228b7447f2b60f06dff6368816e502ecb292647a6819f074b071a9e  test_171.png
cf692e9c08036994f21aeae89113639321650d239282626f426dc548d29a2172  test_172.png
e5da46cd46b70073a4952fc69c88289262e6e6d11edf1230ba3cc703012d1b31  test_173.png
d9ce1be05bd8a07a875c5caace5340f66d66f284b6e1ea7785b07659f6ef8b56  test_174.png
f7c438a28399c4d1171f977433f357b40ed88a5d33687638984b10ec35a17b40  test_175.png
c187a24b386770654d6301b7af6f3927aea8566c6c1e54b453036d9dfeef5981  test_176.png
83350a948a2018a8cecb11ca905f82cb495527fdb42ebea91ea29dd358763eac  test_177.png
e9b80afafa76846b5079a64ba8dd1f84d48d8c5aedcc8a46d4bd2d3900e84373  test_178.png
24de7d635f501859d0c9f8d8a1712e4b025f6955b8bf673442de635f06a591e8  test_179.png
18afdcdfd2e579e6ba574fa8ca7feb6d858d7dac12f790ec21d341c243a86b6f  test_180.png
6fff79895635686454550f671413740eff7543fe8f795c58a657f8437c6cd316  test_181.png
93db8cbb040324a1f7906602d9e2308b77a5f1868a7363c4daf98c5193c3726e  test_182.png
e6ba99f8c0ed04e38775ea7dcd8c3c1971c533e32d66d3c6f8ab1aa2de8f56c6  test_183.png
01f02312425dae091522000df248d93fbb1709e23a5a370ca363f281b23ccfda  test_184.png
f545273ca2875c5b4a49368b840268f74b19acce16e3e9845281d84b11eb2c45  test_185.png
dc07e6a8b559c754effda6a3fb419e7eb2ecf5fa4109588f8ba2acc2e5edc03d  test_186.png
200f48522fd92c563451a981fa479ea05e5cd23c98320f8e8262fd67ed1a00fa  test_187.png
28afd1d1155f41c52b42f5b168121561ba78fbc9f370305f7309d5515a4e6fc6  test_188.png
097e53bdf59876d02f4c2ab4c3b3258c514fb07d364657040cad9f483391bb6e  test_189.png
ca0b6e93d0cc01662025a72b6ec5b90e6baaa872d7c3afaef9eddd180bfda0a0  test_190.png
80e6577c16fe89c6c1f09a42d17ddb69fa5afe7585e3a6a56dcd9fda8f8d011e  test_191.png
1cbd5dd1b5323671434074803f9b856f99d4086d693758660722866cd9905dc2  test_192.png
d163b75fe3b5162e65cfb1c9daa83dd6595427f447c551665144eb065c378ad2  test_193.png
abb3a9b5ce8fdaeb070966c7b5f26511320b5baaa8c1dfecc2db5f6ed985bdd2  test_194.png
f3767c5e14b2df3ddbb24976d5f706d733261e5de2112410ff2e8eadf6142591  test_195.png
184c1a8c2afe59e893c4c0935d465dc1f48cb210de862ffac6c0565c2f8e1843  test_196.png
d1b52a3cd4fd4fa9c795f33532bd55efa604e8659a0004b5a2c5b06447526e36  test_197.png
bc31a607823917e2d9dc309631dee5e5737de57ac8d754d98adc960334e152ef  test_198.png
370c8b08e46deda65616a2716b83fef63959e61777b4f077edabf9976f7d8c86  test_199.png
45c4138428a8ee5e5794c356e614ec39dc9f2bad4396eaf1f4b610ee48d85180  test_200.png
40fa2ee7b93c1680410796892b3d4f41b391947f515187782b41f28e142bb870  test_201.png
4a59bd6cea3173496aedb3164d12efc0bbfc77c7c0708f4fc533d7585fc2c63b  test_202.png
9d74c52f6e18b3aa51f8ccf95031c1a0faa952bcb42f502a964c53d8734eb75b  test_203.png
217ae11b2d08cc8c29ad31043e023d6e7d70d0765ac7551e6bf1751e135f34b8  test_204.png
aff627e9e031dfca91422a6a2cad1a0710c1f1154384a365b7a5c3e196ced417  test_205.png
f4a4f5f4d34a59941c0db3745731d8f72e10040d1873fa21efd4dca5ebc40b6a  test_206.png
d18e76165788487646426c6f7b5f4e281deb08a078db7801e7263b3a95aa48aa  test_207.png
e8b2c940ee075164d8537f6c4616c560f3db63a536a3d8ba152efd99a952f388  test_208.png
cdb82df08b08aaade893131fbca31167e6ad2d9826347c9d745cb2574fe8d726  test_209.png
f6c2252916f5c7f4f5462c24d8dafe27cec7a2afda607fe59362cb329b40c146  test_210.png
3135c71ac5a1be50fbafc7ee6e691c7627471170be2bd59e5306c71486400c11  test_211.png
992c7d32103a310513aa56f0989ae6f38dd9925d38a50258014a2d68459d4c14  test_212.png
106c625bd448af7bde365a350c0ae72892bae87d1789c1b20acdae3eaf4c3652  test_213.png
4886ad75fde4c403b10c762a9ae4c45fe40b707c11af027b75914338901fb587  test_214.png
975dd48e2dc33bcd7dbfd57b45cad406d579311055f904167918abdd8164dc05  test_215.png
e6e9dae7e7e01d2ca1d265b1b218b320b15c50793737224b8f838344d2e4e9d5  test_216.png
49997a61f14540066a60d33eab1f91ad1870f19a6396dff76eb6877615087f90  test_217.png
d71098295c5159e2aa9602a35f0e7fbb1285e2efd68eb724aef092e68d604c6d  test_218.png
c315b0f350ef364f47772a3d6baee3b6441f368a8e24ddeb0f6383d8efc96b0f  test_219.png
5962600439cb1cc8e2121a053f74566038167fa765dd69c919fff5e9ffcef365  test_220.png
2b93dc92e50ac274ae7a5c8c3e3b96c3a670f5262a73875af2ce655150ac94e8  test_221.png
1b24e2f7f804398883399e10be8d20671c7b5d7afbf7f87e939844386fb52308  test_222.png
ddd5cc2b3245d0ef89b8d9ac577eb3f55bcd8384c6aa86edce51605e8fce3379  test_223.png
f1c6975d87a8ccb2f4318763bf6bb125509079ae8bb8f6dd6810a6544bca4304  test_224.png
57a8524747e874c135026a8841fb08ededdb5472966301658afb6af085af2819  test_225.png
c629bd6f47c0e6d1fd0189c95d08aa96fed72dbb2aa12f3650eeb836261ef32e  test_226.png
650eda7df41de76e858f4ab44c7555810ac142820fd2a959f1d68dc1cfd87a88  test_227.png
3283ad1b152079becc83c116b7054628023cf9d04cf32f6548780bd67ddf9729  test_228.png
4ef2263558342f7ab9b4371cdd16419ba30401488d49a5e64b6772fa59bb3b2e  test_229.png
833a1523e05c82d3d53f14b29973c5a15e361583bba68d10c4b41e0ae1f6cbef  test_230.png
926e11a07f84dc39790e4ca69399a024b207502c11bb98b5c017f55cf63a334b  test_231.png
e4f74d75c88f3c4b3f4cdbe7e8beda6303b57080b71f4b448817b7445569ee54  test_232.png
a4ae876005838c9981a2c0db9e49407492a6de0e546dbb304501501a0d8ac256  test_233.png
7d99fcdc23942ac527b2d5aa34346a6b1744bd914e3f6553201e982dccd49a0a  test_234.png
6108ec12e71c40205e61ae2a8ac57deed1f1881cceafac799e4f64b43f455bc2  test_235.png
b9d7d493c59f279d0dc0cdb08d6f331db3698148ef33923437cb4ac229742c48  test_236.png
ba34b9001db618ac75104af4ca7a15fbedef0cb7526470abd435e8a8d9ad6453  test_237.png
e7e9d0c6961dd00e8a22991a50c0a5c3a33d3b734d35979e43f666148d37743b  test_238.png
a3a9a2c71a3b3c1fd0d26bae35a00863e2700a9e290d2641cbba40a09d8d4f9d  test_239.png
05b1f7f039d133d1d1cb51c0b579ecdd9bfac4b3024c94b0aa78ddcfd6cbdc38  test_240.png
f6262a773dc77756166b54d4efc98e0c48c302db22f0e799702fa395f1e31865  test_241.png
ccb68911c31b4abbe84cc915a5932bba7f2e6c1511b338bd8adce98b12f45c66  test_242.png
259c74d82c1411a7b0d462c3c5e09bdab47e19183b7d44e3cc4d84f7e7b88069  test_243.png
fccb68bcf42c3f0b05a32fe6c08eba1a7df728f3ec23b02171330eae54d7890c  test_244.png
2d7229087d6e2eaa30870f7c2f60b5ce45d6dad717c6d60c8aaa8856c8273e3e  test_245.png
ec5f194ea22b7b127e4e57c865a468662aefd70b6c1ec9fa3adc59e091b4d910  test_246.png
712eebbfce992848b0c654954ac84dfbd5fc932e72205e3447bf3aa55d1ab606  test_247.png
1e767717b53684d29bfb7b4b5a085f323fffd219d566a06499f22f3389dbba0d  test_248.png
ef47b401b0b46c65d5f56daa5dae8d2d6b16ba714bd7d713d57a7f9dd2fc4c58  test_249.png
e0e8c6e439d9021254e020e00e38aaeb841f81eac97bc9ca6a41a46a372b4988  test_250.png
768c91238bbae208a47dba72045fe289d1fb65c54c184a9de223e675f0a494be  test_251.png
74fb435c626eb1357e9c9f2572265213773a812c2b22c284ffd16e151f795c70  test_252.png
d92a3e08ac054f7718db64fe8a28582ce62c5d2de547176e26a3db8ec42ecba8  test_253.png
1e43a7e974378a3020b3c4c00514adeb02f086810be35ef2d24c7b1d2e97aa0a  test_254.png
af6db8662141dbb0c28e0be3b3ffb1ee30a4e42ae02e78a79e272836b11ef7a5  test_255.png
e9263f13b0c4c61798453179d1b63b0c03e3aa7eab6711d11c259e8b17d16969  test_256.png
2eb87fecfb94eee3364bef66434c1e623c0d7a9547be86bffe17496d2524ba84  test_257.png
76be058cb43209124f13cc178060ea985122560b237dee910514ceae4d7e336e  test_258.png
b7763d98a29a48b7c51b4096fa65938cb3c85a569857e8180425d12e82fa07e0  test_259.png
b127a778a9c014c7f3aad463af7c7455f8b7e12b69d202778bc16f16fe0e0306  test_260.png
2416035809da57c02e6aaed408cb96cce1b66b894c182cfe6d2d4b34b476fd0d  test_261.png
69f98107e07057dcc0aa498aa2ed6da9a12a23fd9d4af7a17051b54958288dc2  test_262.png
e2299376b0c0471b80d8e37cc10f73c3b5fb2ebf1ad533e43317bfea7cf48a87  test_263.png
792f0bd9d58472a21dd4f0b6d280f8ed6b1d5adb2461dfc57040af57f32794eb  test_264.png
df65c9ebe48d6e76b62f895a8c81dc06c5c11f14ea7c6073f8b9952dc799f5a6  test_265.png
696e0ffe663f56ff0e6f1b9ca94059dbe8f5e27321ada795d909965ea26c52a9  test_266.png
880aa75d182fc8ac8d7e27fda68462bf781da347b5836068f3a21de5b7ae6421  test_267.png
ff59f00889fc26be30afcda820edc59caa62a6c08ea4d73f377eb39f70a4d908  test_268.png
5162500d5d35e43762ad59d8fda4bca4bdefe1a250a1517c2f7b13ea278e2a40  test_269.png
358a9e3e5f975eb7d4cedc6145568d7410187ee84a58fa4a1ea5d7f6dd8842de  test_270.png
f465fa8e28c61e55dd61a2252dd13adc3d6ba59b2fab488c807df841c177ff5b  test_271.png
2926216fcb7a7175fe9f321f9543144fca1b0d485179703c9d3c28a4de560cc3  test_272.png
d07c041d78bfa00a9da66fc720c4af8c9224df819f5335d167bcd765703d74d7  test_273.png
ee5e20ba8820c5fe4b60bcc25475bd5d3db3f758ebb988322be9762a68f494f4  test_274.png
d17e6badd75d449cc1a1d224a28142afb6f790267d40f6f7ed68cc1c956b359f  test_275.png
910f50c356f7aa50cb7535e527e1d685a72e67addf0e5b8a227ebf327d85e22d  test_276.png
64fd964228f349a052b3bf0536b181daa652e641a5e339c85715e91fc65b8c7b  test_277.png
23a746e8a0a6778a33680bcb87f5c1df2149a97c5f7aae7588d9824b654e369e  test_278.png
42a71c0aecb9bcdad15bc68f484366a2cabac159b9b1ee8036d164f2cee36542  test_279.png
f4343e1a8150aaea31d3a63c6502157ec80bb2edca7626faee586dc9e729fda1  test_280.png
bf6c962a3503e652b3df388e09d3fcc4c957929225a6627620ce26e3a746e000  test_281.png
c60b06350220585e665a6318bbce1b79d4fe0c6336607c3a4a2ccee331da6d08  test_282.png
8fbe3856d3810823b21dfebaaf9e3337cc759f3a93809c3fe73f554f35fe06d1  test_283.png
8ae6089d0b724b3edd04ee11409607944d6ffa03fa6f5e0bcc25028f0677b9e5  test_284.png
9dd848e230ebb13773686327eda814232fc0353da8cdfe68b41e1bb3bdc7b3d6  test_285.png
5c94d32e6fffcbc86816db8eef779e4d30a67d9d3246f5077d979a1143496000  test_286.png
69437d614fd4fe8adee559fab5cabbb82cbbc20902d59665b18aba2089eb7ae8  test_287.png
7fab7d032890446a5a5c795a3776324f92b8b9fd3870b28ac73cd39850c6c0ec  test_288.png
f099ccc2172a356a6c842435adc2e54e6fa3e371f42b4316815a24cd52f6e2d8  test_289.png
b6e66faa0e373318f3aab5d786fdeed036faed541c9a61f3ed5869b5563bad76  test_290.png
65b2d4db57f80e63150b37d3385c4e379c80454a1bfd1819b33629eecc6c0603  test_291.png
e9348b58bb530d5cebc1b380d56620544f98c1b67fb76c54a0de1a9f7fc69269  test_292.png
1dab2106cae0c9fabd6aa80c9436cf6a42801a651e927ca2a5bdd1561b772c99  test_293.png
7fd0d866f5ee2fdc318c28e32281871e2dfdcb516d3f01b0171c87aec3bbd4af  test_294.png
efdc3015c739c28e32aa4558f0918a76dca0e0a6a926eb4c24b4ee2be6513cea  test_295.png
5e538c88d16336adeeb67aad64a43858217c2fbd61057ba41786e8994754017e  test_296.png
cf8ae816d8967de437ee180430f79d73bc28d77cc36487e1fa0e875cdbdc9b10  test_297.png
b9dbc605ec689227727203f90dc850064cca1a25bd10d16d9977a15a20535e3c  test_298.png
d54bd14bd33f0710ae0fef6a4b09f9d7a4e2fb36c3e36c241b8fccc2e1369372  test_299.png
e69eaeebfcc8f20317f43e49416e44451ee4ec0891c33f9a2fe87e5bb323ae69  test_300.png
3cb0adacd44a8670921a03502081b303f900d3d106af734d7c7ea82c6fe7233a  test_301.png
da34377ba1eb3eb077a5caa5bec7a99050b7c038aefabefcab8162181332d421  test_302.png
9033e701d8c01c250557912951b4cf026a193dfab4501ca4f60f7951535ca4be  test_303.png
ba16990f7764ec551af7dcf84b92b21b8ab29ad9e600bf1f32b5de9f807c314e  test_304.png
023d327f1470f088c00d5f9638e4f3272627811d367831022e2014afdba76dc5  test_305.png
d2f4b44fb2340658a84b946359e3be23f846ccbe50bfb378e50b7d1dca91a8c8  test_306.png
9fc654f478a7bd3b03bdd36ddfa95ff5a111f33820e4331e3193728afcb8966a  test_307.png
066077d96f28024d33b415916a56f581bb96a12ad5a3ac532fa79f000b9e2950  test_308.png
5ad919a48569da8819daead1861e64793db183975965f84907a5698119f1acd6  test_309.png
01c464b6332e39c57e56917f7bc16f34830f3da361b0c5efcd8cdb54ed18c6a8  test_310.png
05d80ba566bccfafcc6b2583e6bfd5c969cc2434249159e80e020fb571706814  test_311.png
82592996167b9c8847ea0a16e84c064f96ac96290a8b3495a8d9ba1a1b061d1c  test_312.png
611ac3b718f57183e0e155c9cd34764a98b1d7ac4b546ddfe2a0e415623a1c10  test_313.png
dd727dce90083174d157b314559ac37829d85acf2fa2e7bdb7e36b3f1f1e2030  test_314.png
34c60a16e0bb7d4dc677f766d9cc87decd149fb7cd65f9df809cba11278409b9  test_315.png
700a51341a4685d720752aa908589cc1fc03414a227dfb4c5491c1db8b2a614e  test_316.png
93f2b7a6ce08584831776a2df7a2b2f63668c98cb1619b8c605e02c504100103  test_317.png
d200b334776a0d17375c594b932685990a3d22f3323814faec6506467d483d13  test_318.png
1ef84766b5374b99f6e263980f52b1a2cfe39c577c33758e758478411ad4d7ad  test_319.png
5075ee5234ac4c6c17870de2831914ff1a1fa8f90b187f7aed65c8829cf21156  test_320.png
3d720768a7c4cbe2fc8b59a7722b10aeb8e3d10ba9dce02fcebbcba515ef10cb  test_321.png
0048975edb772e5b3aabdb30b195fcdebfaf0a735f0740c1e3bb79c262597ae4  test_322.png
8b62d25dd2443a176fc4d9a56df442344f87e8352eb2144dd9c65560430a8670  test_323.png
68110ae4a14b9361edfdc77fa000e4db162dc870bcc60d81f3202cc89d00536a  test_324.png
6c70b35b3d50196ff69c22bec74858064fa9c63a2387e3fec881cde3582af747  test_325.png
33ef1dbb6527641de03c060db109707d24eed3c89e13894705c6d037c89719fe  test_326.png
c1eabf8fb32234a7ae0cfd8d72b085dd70dbf84b15d517069d2724ffe9f719e5  test_327.png
1ffe90f750371b3b10d1200b279c7406acc6c61595fb86702401ca2a213cdf42  test_328.png
7e7eca742ddfd967394a6d789a09cf0c60cdcce0729a8425466f3cdfc38c090e  test_329.png
376f1010f11d7e8d9559fada675507424a8b3afadffa85034f2359e737d140bc  test_330.png
e7afe34feb6d7caef563e92f0e6f0912c2e0c8f9a5a661178ef947b0a4ad3b72  test_331.png
50577ebb669bf1a110dee7c2f548d533e2dc436c09321a202d6aa4db871f5ed1  test_332.png
45c82b7ebde24b62161bc6d5a5d0f9718304588e94781b03436a334b16e5fae2  test_333.png
885594b0d4e255a688bafaad5d6e1fe395e08c778fc40be5ddf1ea77b8efc2e7  test_334.png
beb0b778e2ef20f89a00d32cc962ca779afc73fb36b976b58f42fa7b299d625d  test_335.png
61b6ffe738724ffbf25960d4ee5a24f20a3597a33c393bebab0f04b2e7325ffa  test_336.png
066b23df3662bde153f2859982ebf7715d6c43414142d04ccb2d3e32a9b8df34  test_337.png
68471e04b6586c592c9c19616738a26f010532c305c778194898b4ef7e349e20  test_338.png
9059314e50e95e3db906be3dbee7a0fd8106076327cfbc7ec7612258a14e11b8  test_339.png
011863bd6de995c722ab736dd58e7ebb25e1ae303ca4cc3116e2758a4028ff8c  test_340.png
d59f761117dee8577fb31d5d040fe03e401e01cba9146426314d6ac9037acbef  test_341.png
5661554e28b6cf7875b61ab4a9d5aaf64e22ff59044d98d726aa453786e5ce1a  test_342.png
2842ce8a707fe2443cae365bd17c880741291af88867e2b4680ad2067a6314ea  test_343.png
f295f6976d5f3b32dd3d2c878f564af0eaf9d21beb46b41083e407b2b0437af0  test_344.png
29ae305ccc57c1ffe75207dedacd7a3f3d4c25167c6e1ab4c8577797910a64ad  test_345.png
8389abdd5ab7a89534f07b03334582b4e20a082db833e3879124b270ab1dd821  test_346.png
837206051b37e4c47e7d14d007bbe7177ff3e741ed8cf3f894ecb5519673aa41  test_347.png
1bd70993873a98489a496a9681dcfae73c02f5fc4abadc93109685f06c28beb2  test_348.png
162465bdd7c712ae4cb9cf6df9f95058daf204cb1ba37179b635712d4f40249f  test_349.png
71839294af7d189663c2864820f9699dea6c52b42f69289e172ef67ca68be625  test_350.png
d1ca02858e25275443946a6f6f3593655e5790d47d7a74a894bfbffe369c9508  test_351.png
93d659bd7c9fb8102fdf2b769ebe03d6ece6ddd8e6d3b711b540ebfcb6f73700  test_352.png
21c9e28ffd7c33049f8afa3fad947c2474c38f2ea484873b516f70a1987fb713  test_353.png
80319cf7b1184a7681548799394a16dcf77a395beb07141f79e821f96a0a1144  test_354.png
1448c425969f669187b8d35f7d400b69c31bed22d6218c6dc48aa389e2d05d4c  test_355.png
61dedd5216b01a128731a07c42349d109a3109ca691e9b4bdcf990145200df04  test_356.png
b9e8600d9d4aa5ab718a51fda82d3e4758924608dde2a210e7ea2b6bd3e8be9a  test_357.png
12a2344cd875c4309bf75afb4c39f30db88ebd1d1c7fa6610d0953ba32c0a125  test_358.png
16657fde3a723bc8f029bd3b5630b75e8a9c25aabbe3f527e1e983bb64873c70  test_359.png
e34d7a6f83ecd17c3f89c04d5723f0928c4ce47b0d57b4a53b1a150e80fe3339  test_360.png
4aebd1b9b7a037db757858c6c9c1a8ef6a4c8a4ce7cbae333f3670b6929ab314  test_361.png
c6d75f3beae2cee88ae50c5a7c4cccc15011a77acec2db51e2a783bc03f2d9e7  test_362.png
9d2b2f84d7c116b5772bcf7750350568c2ad4d8f92e1509b7c58b9f09ed38dbf  test_363.png
f85ba7395114eca8ede8118ac763cb3149ad18ef30c3c9d803beef02644bda15  test_364.png
67ae243a73eb1920567a14100421c2ffe46773dc35544ad7b89e09aac8522e9e  test_365.png
c669d5a7d3198ae9bb2219ad91c40d866c66e0575f49be4a1830f28133b7c5e6  test_366.png
0db1287f42bbb869c895cae3a1e57642b03f2ef591c92b57b743f31b492ebd49  test_367.png
60cc0db870aa386f2f84aa199f8f24829d6255e7d5d9216ac60cece46e77b663  test_368.png
a397fc8409715ade76801fa091c8a770d37cab52550a14cc396a1a7f040e82d5  test_369.png
c94c538f97047d6fa1622c90e239b103636184524e431acba21b93ce297cccff  test_370.png
e8989dc5bf6c4fbf2ede1ce69ad3d8954f08e1e58c1a89af7214b891cbc41359  test_371.png
00b2be842dedc9e2c3ec78dcaee789343862736b29ac8d24ec316a457af55440  test_372.png
cf3bf1626774cc6a04603cd04ecd495edf454a7fc42c3813e53680c09de5449a  test_373.png
08a42539c544884ac700d73def97342fcc9be5f47228e88b633bdbd54f3072d4  test_374.png
ee7f9fa93e255a70a332e5211338d248d7708657c7ce7031b3b5bcc30b40f334  test_375.png
5746e3682b77de2ce94a362ded48a6d48c6aef8fb795c975447682c7d314a492  test_376.png
68f06b2560531c5ef98217217d8e5f59c34f56d2296dbb7aea9c6e4268be2d6a  test_377.png
17d4a788c1a23831cbe9de2ed6d5b7c9719e481aa1e01b8e8a07f6027dff11f2  test_378.png
5efdd8e2d0729567d1d3d1522685a083af1d92667de003c45e37feb486d135e2  test_379.png
e00a5de55df54fbab63dbcc2e27de878870e039486ff04a7b4fe665f129c41e3  test_380.png
415f77e22416f55f88c51303125eb72e7d5ab9f6748f0f49934c0fc5f83a4ce4  test_381.png
39dc4ca78646fba42fd13e1c46e306d1e94c409b521436127958994c660030b6  test_382.png
fed8f1d4a7809f4cf535ee0684ce8ef76f57b48f9dc97818721864e2427ac21a  test_383.png
e93a3e2611376da389795a1a7335a4a852e0279537d6d321de699e9c9c564731  test_384.png
39e10316ff452655d52ac7f3906df187271c98851f0a371d1a2d194a2755a88f  test_385.png
63d2bd553a53531798980940f8f7aad2c2d0190a984788c77438b6c5d601894f  test_386.png
16cdf4ec4d0776fc7fbf009db5a2f45fc6cd09745eadb6311ab06e6014ee3716  test_387.png
db99edc3a818b9c07a9793fe13e7947af9ddbaf9457d171bfacf4aa77dcab5bf  test_388.png
8f7b50fdc77abaa0c7bd0aebe18397493e55ff697fb2740caf0641b8c175197b  test_389.png
6c835aa372a60926fdb32c46fa2cfebe1fe061bb6020f80cb6cbcbd05de97d6f  test_390.png
d95975eae9f791c96138ee73aed8ba967f174c558ae16d5a15a7813944a11459  test_391.png
906c60d67625d856607ecef2123a8e34dc7b314af1c5ed5b923f0fbdb23a560b  test_392.png
0acb0072f82d2d035c61af32e0b20ef364286eaa680412647c80570efaa3ca27  test_393.png
ed69a1f7e1e63e2c2e9121b11fa54edf2f221cfede025b5bd02f17b26e67a568  test_394.png
9006bb887591a0b6aa90e6a1b0dee84a1a4c5fc2a4650b765ec519ca0216a25c  test_395.png
a7903f98712d312f8935a467c1dc8cb1626a94250b325713bd188b55c65ceaae  test_396.png
bd182813ec06ec67a89a0b3e72e35f71ad6693984d84c60dfafa26a8c58e9d32  test_397.png
354c20ac0a67c2e1b93f5a5ad221ace0818bea9bd739bd9026718de09bc24147  test_398.png
64b29487b119fef12677688d13e1aef2d5196c52b0e04db4552a4df45d382f1a  test_399.png
b3d29b69b3d1b93023f708c8ff36093476aa26ab89560387d16a3cb10690d9d9  test_400.png
"""

IMAGE_DATASETS: dict[str, ImageDatasetSpec] = {
    "train400": ImageDatasetSpec(
        name="train400",
        origin="https://raw.githubusercontent.com/cszn/DnCNN/master/TrainingCodes/DnCNN_TrainingCodes_v1.0/data/Train400/",
        sums=_TRAIN400_SUMS,
        test="set12",
        description="the 400 grey 180x180 photographs DnCNN and its successors train on",
    ),
    "set12": ImageDatasetSpec(
        name="set12",
        origin="https://raw.githubusercontent.com/cszn/DnCNN/master/testsets/Set12/",
        sums=_SET12_SUMS,
        description="the 12 standard grey test images (256x256 and 512x512)",
    ),
}


# --------------------------------------------------------------------------- names and locations


def is_location(name: str) -> bool:
    """Whether ``name`` names a folder of images rather than a registered dataset."""
    scheme = urllib.parse.urlparse(name).scheme
    if scheme in ("http", "https", "file"):
        return True
    if scheme and len(scheme) > 1:
        return False
    return "/" in name or os.sep in name or name.startswith(("~", ".")) or Path(name).is_dir()


def dataset_slug(name: str) -> str:
    """The dataset's name in the store (download cache, shard folders): a
    registered name as is; for a folder, its base name and a hash of where it is."""
    if name in IMAGE_DATASETS or not is_location(name):
        return name
    where = normalise_location(name, must_exist=False)
    base = where.rstrip("/").rsplit("/", 1)[-1]
    base = "".join(
        c if c.isalnum() or c in "-_." else "-" for c in urllib.parse.unquote(base).lower()
    )
    digest = hashlib.sha256(where.encode()).hexdigest()[:8]
    return f"folder-{base.strip('-.')[:40] or 'images'}-{digest}"


def normalise_location(name: str, must_exist: bool = True) -> str:
    """A user's folder as an http(s) URL ending in ``/`` or an absolute path."""
    if must_exist:
        return normalise_source(name)
    parsed = urllib.parse.urlparse(name)
    if parsed.scheme in ("http", "https"):
        return name if name.endswith("/") else name + "/"
    if parsed.scheme == "file":
        return str(Path(urllib.request.url2pathname(parsed.path)).resolve())
    return str(Path(name).expanduser().resolve())


def _is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def list_local_images(folder: Path) -> list[str]:
    """Image files under ``folder`` (nested folders included, symlinked folders
    not followed), as sorted relative POSIX paths."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in filenames:
            if _is_image_name(name):
                found.append(Path(dirpath, name).relative_to(folder).as_posix())
    return sorted(found)


def list_location(location: str, sums: dict[str, str] | None) -> dict[str, str | None]:
    """{relative path: expected sha256 or None} of a user's folder: what its
    SHA256SUMS lists, else (local folders only) the image files under it."""
    if sums is not None:
        return {name: sha for name, sha in sorted(sums.items()) if _is_image_name(name)}
    if _is_url(location):
        raise ConfigError(
            f"{location}: a folder of images served over HTTP needs a {SUMS_NAME} beside "
            "the images listing them (sha256sum format); none found"
        )
    return dict.fromkeys(list_local_images(Path(location)))


# --------------------------------------------------------------------------- fetch


def _grey(data: bytes) -> np.ndarray:
    """The image's luma as (H, W) uint8, as the folder denoiser reads it."""
    loaded = decode_image(data)
    return np.clip(np.rint(loaded.luma * 255.0), 0, 255).astype(np.uint8)


def load_grey(path: str | os.PathLike) -> np.ndarray:
    """One cached image as (H, W) uint8 grey; an ImageError naming what is wrong."""
    from denoiser.images import read_bytes

    return _grey(read_bytes(path))


def _describe(data: bytes) -> dict:
    loaded = decode_image(data)
    return {"width": loaded.size[0], "height": loaded.size[1], "mode": loaded.mode}


def _source_name(location: str, name: str) -> str:
    return urllib.parse.quote(name) if _is_url(location) else name


def _fetch_image(
    location: str, name: str, final: Path, expected: str | None, sums: dict[str, str] | None
) -> tuple[dict, bytes | None]:
    """Stream one file to a temporary name beside ``final``, check it; returns
    its record and its bytes, renamed into place only if they decode."""
    cache_dir = final.parent
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _cache_write_error(name, cache_dir, exc) from None
    tmp = temp_path(final, "part")
    try:
        sha = hashlib.sha256()
        with _open(location, _source_name(location, name)) as stream:
            try:
                out = open(tmp, "xb")  # noqa: SIM115 - closed below, where its errors are disk errors
            except OSError as exc:
                raise _cache_write_error(name, cache_dir, exc) from None
            try:
                size = _stream_to(stream, out, name, cache_dir, [sha])
            finally:
                try:
                    out.close()
                except OSError as exc:
                    raise _cache_write_error(name, cache_dir, exc) from None
        digest = sha.hexdigest()
        if sums is not None and name not in sums:
            raise ChecksumError(f"{name}: not listed in the mirror's {SUMS_NAME} ({location})")
        if sums is not None and sums[name] != digest:
            raise ChecksumError(
                f"{name}: sha256 {digest} does not match {SUMS_NAME} ({sums[name]})"
            )
        if expected is not None and expected != digest:
            raise ChecksumError(f"{name}: sha256 {digest} does not match the expected {expected}")
        data = tmp.read_bytes()
        rec = {
            "name": name,
            "path": str(final),
            "bytes": size,
            "sha256": digest,
            "payload_sha256": digest,
            "source": location,
        }
        try:
            rec.update(_describe(data))
        except ImageError as exc:
            tmp.unlink(missing_ok=True)
            return {**rec, "reason": str(exc)}, None
        try:
            os.replace(tmp, final)
        except OSError as exc:
            raise _cache_write_error(name, cache_dir, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return rec, data


def _read_folder_manifest(cache: Path) -> dict:
    try:
        recorded = json.loads((cache / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(recorded, dict) or recorded.get("kind") != "images":
        return {}
    return recorded


def _reusable(cache: Path, rec: dict | None, sha: str | None) -> bool:
    """Whether a recorded file is still in the cache as recorded (and, when the
    expected sha256 is known, is that file)."""
    if not isinstance(rec, dict) or not isinstance(rec.get("sha256"), str):
        return False
    if sha is not None and rec["sha256"] != sha:
        return False
    return _cached_file_problem(cache / rec["name"], rec) is None


def _local_sha(location: str, name: str) -> str:
    try:
        return file_sha256(Path(location) / name)
    except OSError as exc:
        raise DownloadError(
            f"{name}: cannot read {Path(location) / name}: {exc.strerror or exc}"
        ) from None


def fetch_image_folder(
    name: str, source: str | None, cache_dir: str | os.PathLike, log: Any = logger
) -> dict:
    """Make one folder of images present, verified and decodable in ``cache_dir``.

    Returns its manifest: ``{"dataset", "kind": "images", "name", "location",
    "dir", "files": {relative path: {"name", "path", "bytes", "sha256",
    "payload_sha256", "source", "status", "width", "height", "mode"}},
    "skipped": [{"name", "reason", "sha256", "bytes"}]}``. A file already in
    the cache as recorded (and, when known, with the expected sha256) is used
    without fetching; a damaged one is fetched again with a warning on ``log``.
    A local folder without SHA256SUMS is hashed on every call, so a changed
    file is noticed.
    """
    cache = Path(cache_dir)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _cache_write_error(name, cache, exc) from None
    remove_orphan_temps(cache, "part", log)
    previous = _read_folder_manifest(cache)
    before = {
        **{
            s["name"]: s for s in previous.get("skipped", []) if isinstance(s, dict) and "name" in s
        },
        **{n: r for n, r in (previous.get("files") or {}).items() if isinstance(r, dict)},
    }
    spec = IMAGE_DATASETS.get(name)

    location = sums = None
    if spec is not None:
        expected: dict[str, str | None] = dict(spec.files())

        def where() -> tuple[str, dict[str, str] | None]:
            return locate_source(spec.name, spec.origin, next(iter(expected)), source)
    else:
        location = normalise_location(name)
        sums = read_sha256sums(location)
        expected = list_location(location, sums)

        def where() -> tuple[str, dict[str, str] | None]:
            return location, sums

    files: dict[str, dict] = {}
    skipped: list[dict] = []
    for rel in expected:
        want = expected[rel]
        if want is None:  # a local folder without SHA256SUMS: its content decides
            want = _local_sha(location, rel)
        rec = before.get(rel)
        if isinstance(rec, dict) and "reason" in rec and rec.get("sha256") == want:
            skipped.append({k: rec[k] for k in ("name", "reason", "sha256", "bytes") if k in rec})
            log.warning("%s: %s; skipped", rel, rec["reason"])
            continue
        if isinstance(rec, dict) and "reason" not in rec and _reusable(cache, rec, want):
            files[rel] = {**rec, "path": str(cache / rel), "status": "cached"}
            continue
        if isinstance(rec, dict) and "reason" not in rec and rec.get("sha256") == want:
            log.warning(
                "%s: %s; fetching it again",
                cache / rel,
                _cached_file_problem(cache / rel, rec) or "changed",
            )
        if location is None:
            location, sums = where()
        log.info("fetching %s from %s", rel, location)
        fetched, data = _fetch_image(location, rel, cache / rel, want, sums)
        if data is None:
            log.warning("%s: %s; skipped", rel, fetched["reason"])
            skipped.append({k: fetched[k] for k in ("name", "reason", "sha256", "bytes")})
            continue
        files[rel] = {**fetched, "status": "fetched"}
    if not files:
        first = f" (first: {skipped[0]['name']}: {skipped[0]['reason']})" if skipped else ""
        raise ImageError(f"{name}: no readable image{first}; {len(skipped)} skipped")
    manifest = {
        "dataset": dataset_slug(name),
        "kind": "images",
        "name": name,
        "location": location or previous.get("location"),
        "dir": str(cache),
        "files": files,
        "skipped": skipped,
    }
    stored = {
        **manifest,
        "complete": True,
        "files": {r: {k: v for k, v in f.items() if k != "status"} for r, f in files.items()},
    }
    if stored != previous:
        _write_json(cache / "manifest.json", stored)
    return manifest


def fetch_image_dataset(
    name: str,
    source: str | None,
    cache_dir: str | os.PathLike,
    log: Any = logger,
    test_dataset: str | None = None,
) -> dict:
    """The folder's manifest (see :func:`fetch_image_folder`) plus its test
    images: ``"test"`` holds the test folder's manifest (``test_dataset``, else
    the registered dataset's own test set), cached beside ``cache_dir`` under
    its own name; ``"held_out_test"`` is the share of the folder held out as
    the test split when there is none (else None)."""
    manifest = fetch_image_folder(name, source, cache_dir, log)
    spec = IMAGE_DATASETS.get(name)
    test_name = test_dataset or (spec.test if spec else None)
    if test_name is not None:
        if test_name not in IMAGE_DATASETS and not is_location(test_name):
            raise ConfigError(
                f"unknown test dataset {test_name!r}; known: {', '.join(sorted(IMAGE_DATASETS))}; "
                "or a folder of images (a path, file:// or http(s):// URL)"
            )
        test_cache = Path(cache_dir).parent / dataset_slug(test_name)
        manifest["test"] = fetch_image_folder(test_name, source, test_cache, log)
    else:
        manifest["test"] = None
    manifest["held_out_test"] = None if test_name else HELD_OUT_TEST_SHARE
    return manifest


# --------------------------------------------------------------------------- splits and patches


def content_share(sha256: str) -> float:
    """Where a file falls in [0, 1), from its content alone."""
    return int(sha256[:16], 16) / float(1 << 64)


def split_by_content(
    shas: dict[str, str], validation_fraction: float, test_fraction: float | None = None
) -> dict[str, str]:
    """{name: "train" | "validation" | "test"} by each file's content hash: the
    lowest ``test_fraction`` of hashes is test, the next ``validation_fraction``
    validation. A small folder whose hashes leave a held-out split empty gives
    it the training image of lowest hash, so every split has an image."""
    from denoiser.errors import ShardError

    test_cut = test_fraction or 0.0
    share = {name: content_share(sha) for name, sha in shas.items()}
    split = {
        name: "test"
        if u < test_cut
        else "validation"
        if u < test_cut + validation_fraction
        else "train"
        for name, u in share.items()
    }
    for wanted in (("test",) if test_fraction else ()) + ("validation",):
        if wanted in split.values():
            continue
        train = sorted((share[n], n) for n, s in split.items() if s == "train")
        if len(train) < 2:
            raise ShardError(
                f"{len(shas)} usable images cannot be split into train, validation"
                f"{' and test' if test_fraction else ''}; add images"
            )
        split[train[0][1]] = wanted
    return split


class CachedImages(Sequence):
    """Cached image files read as (H, W) uint8 grey only when indexed, so a
    shard writer holds the images of one shard, not of the whole dataset."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return CachedImages(self.paths[i])
        return load_grey(self.paths[i])


def _entries(manifest: dict, source: str) -> list[dict]:
    return [
        {
            "name": name,
            "source": source,
            "sha256": rec["sha256"],
            "path": rec["path"],
            "height": rec["height"],
            "width": rec["width"],
        }
        for name, rec in sorted(manifest["files"].items())
    ]


def build_image_splits(
    dataset: dict,
    validation_fraction: float,
    patch_size: int | None = None,
    patches_per_image: int | None = None,
    train_limit: int | None = None,
    test_limit: int | None = None,
    log: Any = logger,
) -> tuple[dict, dict]:
    """The splits of an image dataset manifest (:func:`fetch_image_dataset`) for
    :func:`denoiser.shards.write_shard_set`, and what the shard manifest records.

    Returns ``(splits, meta)``: ``splits`` maps train and validation to patch
    rows (``patches_per_image`` random ``patch_size`` squares per image) and test
    to whole images; ``meta`` holds ``images`` (one entry per image: name,
    source ``dataset`` or ``test``, sha256, height, width, split; a row's
    ``index`` is its image's position in this list), ``skipped`` (files that
    did not decode, with reasons), ``too_small`` (images smaller than a patch,
    kept out of train and validation), ``patch_size``, ``patches_per_image``,
    ``test_dataset`` and ``held_out_test``. ``train_limit`` keeps the first
    images of the dataset by name, ``test_limit`` the first test images.
    """
    from denoiser.shards import SplitArrays

    size = patch_size or DEFAULT_PATCH_SIZE
    per_image = patches_per_image or DEFAULT_PATCHES_PER_IMAGE
    own = _entries(dataset, "dataset")[:train_limit]
    test_manifest = dataset.get("test")
    held_out = None if test_manifest else dataset.get("held_out_test") or HELD_OUT_TEST_SHARE
    assigned = split_by_content(
        {e["name"]: e["sha256"] for e in own}, validation_fraction, held_out
    )
    for entry in own:
        entry["split"] = assigned[entry["name"]]
    tests = _entries(test_manifest, "test") if test_manifest else []
    for entry in tests:
        entry["split"] = "test"
    images = own + tests
    test_rows = [i for i, e in enumerate(images) if e["split"] == "test"][:test_limit]
    too_small = []
    for e in own:
        if e["split"] != "test" and (e["height"] < size or e["width"] < size):
            too_small.append(e["name"])
            log.warning(
                "%s: %dx%d is smaller than a %dx%d patch; not used for training",
                e["name"],
                e["width"],
                e["height"],
                size,
                size,
            )

    def rows_of(split: str) -> list[int]:
        return [
            i for i, e in enumerate(images) if e["split"] == split and e["name"] not in too_small
        ]

    splits = {}
    for split in ("train", "validation", "test"):
        picked = test_rows if split == "test" else rows_of(split)
        if not picked:
            from denoiser.errors import ShardError

            raise ShardError(f"{dataset['dataset']}: no image left for the {split} split")
        patch = None if split == "test" else size
        splits[split] = SplitArrays(
            CachedImages([images[i]["path"] for i in picked]),
            np.zeros(len(picked), np.uint8),
            np.array(picked, dtype=np.int64),
            copies=1 if split == "test" else per_image,
            patch_size=patch,
            shapes=[(images[i]["height"], images[i]["width"]) for i in picked],
        )
    skipped = [{**s, "source": "dataset"} for s in dataset.get("skipped", [])]
    skipped += [{**s, "source": "test"} for s in (test_manifest or {}).get("skipped", [])]
    meta = {
        "images": [
            {k: e[k] for k in ("name", "source", "sha256", "height", "width", "split")}
            for e in images
        ],
        "skipped": skipped,
        "too_small": too_small,
        "patch_size": size,
        "patches_per_image": per_image,
        "test_dataset": test_manifest["name"] if test_manifest else None,
        "held_out_test": held_out,
    }
    return splits, meta
