"""The layout of the arrays the synthetic-patch kernels pass around.

A slide's style ``S_*``, a scene ``Q_*``, a patch's paint vector ``P_*``, a
cell row ``C_*``, the field planes ``F_*`` and the shared noise tiles ``G_*``
are plain float arrays indexed by these constants (numba kernels take arrays,
not objects); what a patch is asked to be is a ``T_*`` and a cell's kind a
``KIND_*``. :mod:`pcamtool.synth.plan` fills the slide styles, the kernels of
:mod:`pcamtool.synth.render` everything else.
"""

SIZE = 96
CENTRE_LO = 32     # the labelled square: pixel centres 32..63 on both axes
CENTRE_HI = 63
MAX_CELLS = 1024   # per patch; dense lymphoid tissue needs ~400
MAX_SEEDS = 160    # fat-cell Voronoi seeds per patch

# What a patch is asked to be (the label is measured on the result).
T_NEG = 0
T_PERIPH = 1       # negative with tumour off the centre
T_POS = 2

# Entries of a slide's style vector (float64, N_SLIDE), drawn by pcamtool.synth.plan.
S_H = 0            # 3: hematoxylin OD vector * strength
S_E = 3            # 3: eosin OD vector * strength
S_WHITE = 6        # 3: light-source white, 0..1
S_BLUR = 9         # defocus sigma (px)
S_NOISE = 10       # sensor noise (grey levels)
S_ARCHE = 11       # 5: probabilities of lymphoid, lymphoid+stroma, stroma, fat, fat+mixed
S_LYMPH_D = 16     # lymphocyte spacing (px)
S_LYMPH_R = 17     # lymphocyte nucleus radius (px)
S_LYMPH_H = 18     # lymphocyte hematoxylin
S_TUM_R = 19       # tumour nucleus radius (px)
S_TUM_HIN = 20     # tumour chromatin hematoxylin (pale)
S_TUM_RIM = 21     # tumour nuclear-membrane hematoxylin (dark rim)
S_TUM_IRREG = 22   # amplitude of the outline harmonics
S_CYTO_RATIO = 23  # tumour cell radius / nucleus radius
S_CYTO_E = 24
S_CYTO_H = 25
S_NUCL_P = 26      # share of tumour nuclei with a visible nucleolus
S_HISTIO = 27      # histiocyte rate in lymphoid tissue
S_BLANK_P = 28     # chance that a T_NEG patch is bare glass
N_SLIDE = 29

# Planes of the ``fields`` array (float32, (N_FIELDS, 96, 96)).
F_TISSUE = 0   # 1 = tissue, 0 = bare glass (tissue edge, tear, blank)
F_FAT = 1      # 1 = adipose (white holes with membranes)
F_STROMA = 2   # 1 = fibrous stroma, 0 = lymphoid background
F_PHASE = 3    # phase wobble of the collagen fibres (radians)
F_ANGLE = 4    # fibre orientation (radians)
F_TEX = 5      # mid-frequency mottling of the eosin (N(0, 1)-ish)
F_WARP_X = 6   # domain warp (px) that bends the fat-cell walls
F_WARP_Y = 7
N_FIELDS = 8

# Planes of the shared noise tiles ``raw`` (float32, (N_RAW, T, T)): smooth
# N(0, 1) fields at several scales; each patch cuts its own random windows.
G_EDGE = 0
G_CRACK = 1
G_FAT = 2
G_STROMA = 3
G_PHASE = 4
G_ANGLE = 5
G_TEX = 6
G_TUM = 7
G_WARP_X = 8
G_WARP_Y = 9
N_RAW = 10
RAW_SIGMA = (28.0, 9.0, 28.0, 17.0, 9.0, 28.0, 3.5, 9.0, 12.0, 12.0)  # smoothing (px) per plane

# Entries of the scene vector ``q`` of :func:`.fields.compose_fields`.
Q_BLANK = 0        # 1: no tissue at all
Q_EDGE_ON = 1      # 1: a tissue edge crosses the patch ...
Q_EDGE_OFF = 2     # ... at this level of G_EDGE (higher = more tissue)
Q_CRACK_ON = 3     # 1: clefts (tears, retraction) in the tissue ...
Q_CRACK_OFF = 4    # ... where G_CRACK < -this
Q_FAT_ON = 5
Q_FAT_OFF = 6      # fat where G_FAT > this
Q_FAT_W = 7        # softness of the fat border (field units)
Q_S_OFF = 8        # stroma where G_STROMA > this
Q_S_W = 9
Q_PHASE_AMP = 10
Q_ANGLE0 = 11
Q_TUM_MODE = 12    # 0 none, 1 a nest, 2 a nest kept off the centre
Q_TUM_X = 13
Q_TUM_Y = 14
Q_TUM_RHO = 15     # nest radius (px)
Q_TUM_NOISE = 16   # raggedness of its border (px)
Q_TUM_MARGIN = 17  # mode 2: nest stays this far (px) from the central square
N_Q = 18

# Entries of the per-patch paint vector ``par`` (float64).
P_H = 0            # 3: hematoxylin OD vector * strength
P_E = 3            # 3: eosin OD vector * strength
P_BG = 6           # 3: OD of the glass + mounting medium
P_WHITE = 9        # 3: light-source white, 0..1 per channel
P_BLUR = 12        # Gaussian blur sigma in pixels (defocus)
P_NOISE = 13       # sensor noise sigma in grey levels
P_LYMPH_E = 14     # eosin of the lymphoid background between nuclei
P_LYMPH_H = 15     # hematoxylin haze of the lymphoid background
P_STROMA_E = 16    # eosin of collagen
P_STROMA_H = 17
P_FIBRE_FREQ = 18  # radians per pixel across the fibres
P_MEMB_E = 19      # eosin of fat-cell membranes
P_MEMB_W = 20      # membrane half-width in pixels
P_GLASS_E = 21     # faint eosin tint of the glass (serum, mounting medium)
P_TEX_AMP = 22     # strength of the eosin mottling
P_NOISE_X = 23     # offsets into the shared noise / chromatin tiles
P_NOISE_Y = 24
P_TEX_X = 25
P_TEX_Y = 26
N_PAR = 27

# Columns of a cell row (float64, N_CELL); coordinates are pixel centres
# (pixel (y, x) sits at (x, y)).
C_X = 0
C_Y = 1
C_A = 2        # nucleus semi-axis along theta (px)
C_B = 3        # nucleus semi-axis across theta (px)
C_THETA = 4
C_KIND = 5
C_HIN = 6      # hematoxylin inside the nucleus (chromatin)
C_HRIM = 7     # extra hematoxylin on the nuclear membrane
C_RIMW = 8     # width of that rim (px)
C_H2A = 9      # outline: r(phi) = 1 + a2 cos(2phi+p2) + a3 cos(3phi+p3)
C_H2P = 10
C_H3A = 11
C_H3P = 12
C_CYR = 13     # cell-body radius (px); 0 = no visible cytoplasm
C_CYE = 14     # eosin of the cytoplasm
C_CYH = 15     # hematoxylin of the cytoplasm (amphophilic tumour cells)
C_NUCL = 16    # nucleolus hematoxylin (0 = none)
C_NDX = 17     # nucleolus offset from the centre
C_NDY = 18
C_CHROM = 19   # chromatin texture strength (coarse, vesicular in tumour)
C_SOFT = 20    # edge softness (px)
N_CELL = 21

KIND_LYMPH = 0
KIND_FIBRO = 1
KIND_TUMOUR = 2
KIND_HISTIO = 3
